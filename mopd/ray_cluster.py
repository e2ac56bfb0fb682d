"""Connect to Ray: an existing cluster (address / RAY_ADDRESS, e.g. under `ray job submit`) or a private
local one started by this process.

When `host` is a loopback address (the default 127.0.0.1) every process of the private cluster listens on
loopback only: GCS, raylet, the driver's and every worker's gRPC servers, the autoscaler monitor's and
the dashboard head's metrics servers (the head runs minimal: `include_dashboard=False`, no UI), the
dashboard agent (HTTP, gRPC, metrics-agent and Prometheus export ports) and the runtime-env agent bind
Ray's loopback address (`get_localhost_ip()`: 127.0.0.1); tests/test_loopback.py checks every socket. Ray
picks loopback for all of them from one switch: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes the node's
own address loopback (`ray._private.services.get_node_ip_address`), Ray hands that node address to every
process it launches, and each server then binds it instead of 0.0.0.0/:: (without it,
`_node_ip_address="127.0.0.1"` is silently turned back into the machine's external address). The
switch is read when `ray` is imported, so it is set both in the environment (for the processes Ray
spawns) and on the already imported constant. Any other `host` is taken as a deliberate choice to
expose the cluster on that address.

The private cluster's processes end with the driver: `ray.shutdown()` stops them all. On Linux the ones
the driver starts (GCS, raylet, monitor, dashboard head, log monitor) carry a parent-death signal (Ray's
kernel fate sharing), so a killed driver takes them along at once, and workers follow their raylet. The
raylet's dashboard and runtime-env agents do not: they notice the raylet's death within about 2 s, but a
raylet that died without SIGTERM sends them into `publish_error_to_driver`, whose call to the (dead) GCS has
a fixed 60 s timeout (`ray/_private/process_watcher.py`), so on their own they outlive a SIGKILLed driver by
60-65 s (holding ~200 MB and their loopback ports). A small reaper process (`_REAPER`, started with the
private cluster in its own session, so a kill of the driver's process group spares it) watches the driver
and the cluster's processes and, once the driver or the whole cluster is gone, kills whatever of that
cluster is left: the agents then end within about a second of the driver.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from typing import Any

from mopd.config import ConfigError

# Read by ray._private.ray_constants at import; "0" keeps every process of a local cluster on loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# argv: the driver's pid, then the pids of the processes the driver started for its private cluster. Every
# 2 s it notes those processes and their descendants (the agents and workers the raylet starts); as soon as
# the driver is gone (this process was re-parented: checked every 0.25 s) or every one of them has ended, it
# kills what is left of them (psutil refuses a pid since reused by another process) and exits.
_REAPER = r"""# mopd: the reaper of a private Ray cluster
import os, sys, time
import psutil
driver, roots = int(sys.argv[1]), []
for pid in sys.argv[2:]:
    try:
        roots.append(psutil.Process(int(pid)))  # holds its start time: a reused pid is not this process
    except psutil.Error:
        pass
seen = {}
while os.getppid() == driver:
    alive = 0
    for root in roots:
        try:
            if not root.is_running():
                continue
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        alive += 1
        seen.update((p.pid, p) for p in family)
    if not alive:
        break
    for _ in range(8):
        if os.getppid() != driver:
            break
        time.sleep(0.25)
for p in seen.values():
    try:
        p.kill()
    except psutil.Error:
        pass
"""
_reapers: list[subprocess.Popen] = []  # one per private cluster this process started (kept: no zombies, no warnings)


def cluster_address(address: str | None) -> str | None:
    """The GCS address to connect to, or None for a private cluster.

    A dashboard URL (http://...: what `mopd submit` and `ray job submit` talk to) cannot be connected to;
    inside a submitted job Ray sets RAY_ADDRESS to the cluster's GCS address, which then wins over it.
    """
    env = os.environ.get("RAY_ADDRESS")
    candidates = [a for a in (address, env) if a]
    usable = [a for a in candidates if not a.startswith(("http://", "https://"))]
    if usable:
        return usable[0]
    if candidates:
        src = "ray.address" if address else "RAY_ADDRESS"
        raise ConfigError(
            f"{src}={candidates[0]!r} is a dashboard URL, which only job submission uses: run on that cluster "
            f"with `mopd submit CONFIG --address {candidates[0]}`, or give the cluster's GCS address "
            "(e.g. 127.0.0.1:6379 or auto) to connect from this process")
    return None


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def force_loopback() -> None:
    """Make Ray treat this machine as a single loopback node (before or after `import ray`)."""
    os.environ[LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, num_cpus: int = 2, host: str = "127.0.0.1",
             env_vars: dict[str, str] | None = None, log_to_driver: bool = True,
             temp_dir: str | None = None) -> Any:
    """Connect to `address` / RAY_ADDRESS, or start a private cluster on `host` (loopback by default).

    `temp_dir` (absolute, short: Ray puts Unix sockets under it) replaces /tmp/ray for a private cluster.
    """
    address = cluster_address(address)
    if not address and is_loopback(host):
        force_loopback()  # before `import ray` where possible; the constant is patched too
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": env_vars or {}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        kwargs: dict[str, Any] = {"_temp_dir": str(temp_dir)} if temp_dir else {}
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=host, runtime_env=runtime_env,
                 configure_logging=True, logging_level="WARNING", log_to_driver=log_to_driver, **kwargs)
        _start_reaper(ray)
    return ray


def _start_reaper(ray: Any) -> None:
    """Start `_REAPER` for the private cluster just started (see the module docstring); without the pids of
    the cluster's processes (Ray's internals moved) there is nothing to watch and no reaper. A reaper of an
    earlier cluster of this process (ray.shutdown, then init_ray again) ends with that cluster."""
    _reapers[:] = [r for r in _reapers if r.poll() is None]
    try:
        node = ray._private.worker._global_node
        roots = sorted({info.process.pid for infos in node.all_processes.values() for info in infos
                        if getattr(info, "process", None) is not None})
    except Exception:  # noqa: BLE001 - private API: no reaper rather than no cluster
        return
    if roots:
        reaper = subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), *map(str, roots)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        _reapers.append(reaper)
