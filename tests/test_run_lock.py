"""One writer per run dir (`mopd.run_lock`): the lock is real across processes, names its holder, is re-entrant
within a process, is taken over (and said so) when its holder was killed, and keeps `--overwrite` and a second
`mopd train` away from a run another process holds. The other holder here is a real second process that takes
the lock through the same code; tests/test_train_loop.py runs two real `mopd train` processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import mopd.ray_cluster
import mopd.session
from mopd.cli import main
from mopd.run_dir import RunDirError, hold_run_dir, prepare_run_dir
from mopd.run_lock import LOCK_NAME, RunDirBusy, holder_of, lock_run_dir

REPO = Path(__file__).resolve().parents[1]
HOLDER = r"""
import sys
from mopd.run_lock import lock_run_dir
lock = lock_run_dir(sys.argv[1], log=lambda m: print("LOG", m, flush=True))
print("READY", flush=True)
sys.stdin.readline()
lock.release()
print("RELEASED", flush=True)
"""


class Holder:
    """A second process holding `run_dir`'s lock until `release()` (or a kill)."""

    def __init__(self, run_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "RELEASED"
        self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture
def holder():
    made: list[Holder] = []

    def start(run_dir: Path) -> Holder:
        made.append(Holder(run_dir))
        return made[-1]

    yield start
    for h in made:
        h.close()


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


def test_lock_is_reentrant_in_a_process_and_removed_on_release(tmp_path):
    a = lock_run_dir(tmp_path, log=Log())
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["since"]
    b = lock_run_dir(tmp_path, log=Log())  # `mopd train` holds it, then its run session takes it again
    assert b is a and holder_of(tmp_path).pid == os.getpid()
    b.release()
    assert (tmp_path / LOCK_NAME).exists() and a.held
    a.release()
    assert not (tmp_path / LOCK_NAME).exists() and holder_of(tmp_path) is None
    a.release()  # releasing twice is harmless
    with lock_run_dir(tmp_path, log=Log()):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_process_is_refused_naming_the_holder(tmp_path, holder):
    h = holder(tmp_path)
    with pytest.raises(RunDirBusy) as e:
        lock_run_dir(tmp_path, log=Log())
    msg = str(e.value)
    for part in (str(tmp_path), f"pid {h.pid}", f"host {socket.gethostname()}", "since 20", f"kill -TERM {h.pid}",
                 "choose another logging.run_dir"):
        assert part in msg, (part, msg)
    assert holder_of(tmp_path).pid == h.pid
    h.release()  # a clean exit frees the dir at once
    assert not (tmp_path / LOCK_NAME).exists()
    with lock_run_dir(tmp_path, log=Log()) as mine:
        assert mine.held


def test_a_killed_holders_lock_is_taken_over_and_said(tmp_path, holder):
    h = holder(tmp_path)
    h.kill()  # SIGKILL: nothing released, the file stays with the dead pid in it
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == h.pid
    assert holder_of(tmp_path) is None  # the kernel dropped the flock with the process
    log = Log()
    with lock_run_dir(tmp_path, log=log):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(log) == 1 and "took over the lock left by" in log[0] and f"pid {h.pid}" in log[0], log


def test_prepare_run_dir_and_overwrite_respect_another_holder(tmp_path, holder):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    h = holder(run)
    for resume, overwrite in ((False, True), (True, False), (False, False)):
        with pytest.raises(RunDirBusy, match=f"in use by pid {h.pid}"):
            prepare_run_dir(run, resume=resume, overwrite=overwrite, log=Log())
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'  # --overwrite deleted nothing
    h.release()
    prepare_run_dir(run, resume=False, overwrite=True, log=Log())
    assert not (run / "metrics.jsonl").exists() and not (run / LOCK_NAME).exists()


def test_refusals_create_nothing(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        hold_run_dir(tmp_path / "none", resume=True)
    assert not (tmp_path / "none").exists()
    with pytest.raises(RunDirError, match="give one"):
        hold_run_dir(tmp_path / "none", resume=True, overwrite=True)
    assert not (tmp_path / "none").exists()


def _reached_ray(*args, **kwargs):
    raise AssertionError("a held run dir must be refused before Ray starts")


def test_train_into_a_held_run_dir_is_one_line_exit_2(capsys, tmp_path, holder, monkeypatch):
    """The CLI path: refused before the config's models or data are even read, the holder intact."""
    monkeypatch.setattr(mopd.session, "init_ray", _reached_ray)
    monkeypatch.setattr(mopd.ray_cluster, "init_ray", _reached_ray)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    h = holder(run)
    for flags in ([], ["--overwrite"], ["--resume"]):
        code = main(["train", "configs/quickstart.yaml", f"logging.run_dir={run}", *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("mopd: error: run dir "), err
        assert f"in use by pid {h.pid} on host {socket.gethostname()}, since " in err, err
        assert "Wait for it to finish or stop it" in err and "Traceback" not in err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert holder_of(run).pid == h.pid  # still the first process's
    h.release()


def test_holder_of_reports_nothing_for_a_dir_without_a_lock(tmp_path):
    assert holder_of(tmp_path) is None
    assert holder_of(tmp_path / "missing") is None
    (tmp_path / LOCK_NAME).write_text("not json")
    assert holder_of(tmp_path) is None


def test_a_live_holder_on_this_host_without_flock_is_not_stale(tmp_path, monkeypatch):
    """Filesystems without flock: the file's pid decides (a live one refuses, a dead one is taken over)."""
    import fcntl

    import mopd.run_lock as rl

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")  # ENOSYS

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                   "since": "then", "command": "mopd train x"}))
    with pytest.raises(RunDirBusy, match=f"in use by pid {os.getppid()}"):
        rl.lock_run_dir(tmp_path, log=Log())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then",
                                                   "command": ""}))
    log = Log()
    with rl.lock_run_dir(tmp_path, log=log):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in log[0] and f"pid {dead.pid}" in log[0]
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then", "command": ""}))
    with pytest.raises(RunDirBusy, match="cannot be checked from here.*delete"):
        rl.lock_run_dir(tmp_path, log=Log())

