"""The private cluster `init_ray` starts listens on loopback only, and its processes end with the driver.

Each case runs a fresh driver process (the session's in-process Ray would hide a second `init_ray`): it
imports `ray` *before* calling `init_ray` (the harder order: Ray reads its loopback switch at import), starts
a trivial actor, and waits. The test then lists every listening socket of the driver and of all its
descendants and fails on any bind that is not 127.0.0.1/::1. Afterwards the driver either calls
`ray.shutdown()` or is SIGKILLed; in both cases no process of its cluster may outlive it. After a SIGKILL
the kernel kills GCS, raylet and the other direct children at once (parent-death signal), workers follow
their raylet, and the dashboard and runtime-env agents, which on their own would spend Ray's fixed 60 s
trying to report the raylet's death to the dead GCS, are killed by mopd's reaper within about a second.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 300
EXIT_TIMEOUT_S = 60
KILLED_EXIT_TIMEOUT_S = 15  # without the reaper (mopd.ray_cluster) Ray's agents would wait 60 s on the dead GCS first

DRIVER = r"""
import os, sys
import ray  # imported first on purpose: init_ray must still get every process onto loopback
from mopd.ray_cluster import init_ray

init_ray(num_cpus=1, temp_dir=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0)
class Pinger:
    def pid(self):
        return os.getpid()

actor = Pinger.remote()
print("READY", ray.get(actor.pid.remote()), flush=True)
if sys.stdin.readline().strip() == "shutdown":
    ray.shutdown()
    print("SHUTDOWN", flush=True)
    sys.stdin.readline()  # stay alive so the test sees what outlived ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def _listeners(procs: list[psutil.Process]) -> list[tuple[psutil.Process, str, str]]:
    """(process, "tcp"/"udp", "ip:port") for every listening TCP socket and every bound, unconnected UDP one."""
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if not c.laddr:
                continue
            if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
                out.append((p, "tcp", f"{c.laddr.ip}:{c.laddr.port}"))
            elif c.type == socket.SOCK_DGRAM and not c.raddr:
                out.append((p, "udp", f"{c.laddr.ip}:{c.laddr.port}"))
    return out


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:200] or p.name()
    except psutil.Error:
        return f"pid {p.pid}"


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


@pytest.fixture
def driver():
    temp = tempfile.mkdtemp(prefix="mopdlb", dir="/tmp")  # short: Ray's Unix socket paths live under it
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}  # init_ray must do it alone
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, temp], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("READY"):
                break
        else:
            pytest.fail("driver did not start its cluster in time:\n" + "".join(lines[-50:]))
        if not lines or not lines[-1].startswith("READY"):
            pytest.fail(f"driver exited ({proc.wait()}) before its cluster was ready:\n" + "".join(lines[-50:]))
        actor_pid = int(lines[-1].split()[1])
        time.sleep(2)  # agents and the monitor open their ports shortly after start-up
        tree = _tree(proc.pid)
        assert actor_pid in {p.pid for p in tree}, "the actor is not a descendant of the driver"
        yield proc, tree
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for p in _wait_gone(tree, 10):  # never leave a cluster behind, whatever failed
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_private_cluster_listens_on_loopback_only(driver):
    proc, tree = driver
    listeners = _listeners(tree)
    bad = [f"  {kind} {addr}  pid {p.pid}: {_cmd(p)}" for p, kind, addr in listeners
           if not _loopback(addr.rsplit(":", 1)[0])]
    assert not bad, "Ray processes bound to a non-loopback address:\n" + "\n".join(bad)
    # The check means something only if it saw the servers: GCS, raylet, driver and actor at least.
    names = " ".join(_cmd(p) for p, _, _ in listeners)
    assert "gcs_server" in names and "raylet" in names, names
    assert proc.pid in {p.pid for p, _, _ in listeners}, "the driver's own gRPC server was not seen"
    assert len(listeners) >= 6, listeners

    proc.stdin.write("shutdown\n")
    proc.stdin.flush()
    assert proc.stdout.readline().startswith("SHUTDOWN")
    left = _wait_gone(tree[1:], EXIT_TIMEOUT_S)
    assert not left, "still running after ray.shutdown():\n" + "\n".join(f"  {p.pid}: {_cmd(p)}" for p in left)


@pytest.mark.slow
def test_private_cluster_dies_with_a_killed_driver(driver):
    proc, tree = driver
    assert len(tree) >= 4, [_cmd(p) for p in tree]
    assert any("mopd: the reaper of a private Ray cluster" in _cmd(p) for p in tree), "no reaper was started"
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = _wait_gone(tree, KILLED_EXIT_TIMEOUT_S)
    assert not left, "outlived a SIGKILLed driver:\n" + "\n".join(f"  {p.pid}: {_cmd(p)}" for p in left)
    print(f"every process of the cluster (agents and the reaper included) gone {time.monotonic() - t0:.1f} s "
          "after the SIGKILL")
