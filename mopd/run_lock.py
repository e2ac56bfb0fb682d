"""One writer per run dir: `RUN_DIR/.lock`, an exclusive `fcntl.flock` held for the whole run.

The file says who holds it (pid, host, since when, the command) as one JSON object, so a second writer is
refused naming the holder. The kernel drops a flock when its process ends, however it ends, so a run killed
by SIGKILL or the OOM killer leaves a file whose lock is free: the next run takes it over and says whose it
was. A clean release deletes the file while still holding it; whoever gets a lock re-checks that the path
still names the file it locked (and retries otherwise), so a release racing a new run never leaves two
holders. Deleting a held `.lock` by hand does defeat it, as with any lock file.

Where the filesystem has no working flock (some network filesystems answer ENOLCK or EOPNOTSUPP) the
file's content decides instead: a holder on this host whose pid is gone is stale and taken over; a live one,
or one on another host (whose pid cannot be checked from here), refuses with the way out.

Within one process the lock is re-entrant and counted: `mopd train` takes it before building the world and
its run session takes it again; `mopd compare` holds every run's dir for the whole comparison.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_held: dict[str, RunDirLock] = {}  # realpath of the run dir -> this process's lock on it
_registry = threading.Lock()


class RunDirError(ValueError):
    """The run dir cannot be used as asked; the message says what was found and what to do."""


class RunDirBusy(RunDirError):
    """The run dir is held by another process; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run dir's lock, from its `.lock` file."""

    pid: int | None
    host: str
    since: str
    command: str

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
        except ValueError:
            return None
        if not isinstance(d, dict):
            return None
        pid = d.get("pid")
        return cls(pid if isinstance(pid, int) and not isinstance(pid, bool) else None, str(d.get("host", "?")),
                   str(d.get("since", "?")), str(d.get("command", "")))

    @classmethod
    def me(cls) -> Holder:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        return cls(os.getpid(), socket.gethostname(), since, _command())

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "since": self.since, "command": self.command}) + "\n"

    def describe(self) -> str:
        cmd = f", running `{self.command}`" if self.command else ""
        return f"pid {self.pid} on host {self.host}, since {self.since}{cmd}"

    def alive_here(self) -> bool | None:
        """True/False for a holder on this host; None when it is on another host (cannot be checked)."""
        if self.host != socket.gethostname() or self.pid is None:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        return True


class RunDirLock:
    """This process's hold on one run dir; `release()` (or leaving a `with` block) gives one hold back and
    the last one deletes the file and drops the lock."""

    def __init__(self, key: str, path: Path, fd: int | None, holder: Holder) -> None:
        self.key, self.path, self.fd, self.holder, self.count = key, path, fd, holder, 1

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.count > 0

    def release(self) -> None:
        with _registry:
            if self.count <= 0:
                return
            self.count -= 1
            if self.count:
                return
            _held.pop(self.key, None)
            try:
                if self.fd is None or _same_file(self.fd, self.path):
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only dir now: the next run takes the free lock over
            finally:
                if self.fd is not None:
                    os.close(self.fd)  # drops the flock
                    self.fd = None


def lock_run_dir(run_dir: str | Path, log: Callable[[str], None] = print) -> RunDirLock:
    """Take `run_dir`'s lock (the folder must exist) or raise `RunDirBusy` naming the holder."""
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    with _registry:
        mine = _held.get(key)
        if mine is not None:
            mine.count += 1
            return mine
        path, me = run_dir / LOCK_NAME, Holder.me()
        lock = RunDirLock(key, path, _acquire(run_dir, path, me, log), me)
        _held[key] = lock
        return lock


def holder_of(run_dir: str | Path) -> Holder | None:
    """Who holds `run_dir` now (None: nobody, or it cannot be told from here). Takes nothing."""
    path = Path(run_dir) / LOCK_NAME
    mine = _held.get(os.path.realpath(run_dir))
    if mine is not None:
        return mine.holder
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or Holder(None, "?", "?", "")
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                return None
            h = _read(fd)
            return h if h is not None and h.alive_here() is not False else None
        return None  # free (closing the descriptor drops the probe's lock)
    finally:
        os.close(fd)


def _acquire(run_dir: Path, path: Path, me: Holder, log: Callable[[str], None]) -> int | None:
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RunDirError(f"run dir {run_dir} is not writable: cannot create its lock file {path} "
                             f"({e.strerror or e}): fix its permissions or choose another logging.run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirBusy(_busy(run_dir, holder)) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            _acquire_without_flock(run_dir, path, me, log)
            return None
        if not _same_file(fd, path):  # a releasing holder deleted it meanwhile: lock the new one
            os.close(fd)
            continue
        previous = _read(fd)
        try:
            _write(fd, me)
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"run dir {run_dir} is not writable: cannot write its lock file {path} "
                             f"({e.strerror or e}): free some space or choose another logging.run_dir") from None
        if previous is not None and (previous.pid, previous.host) != (me.pid, me.host):
            log(f"run dir {run_dir}: took over the lock left by {previous.describe()}, which no longer holds it "
                "(a run that was killed or crashed)")
        return fd
    raise RunDirBusy(f"run dir {run_dir}: its lock file {path} keeps being replaced by another process: stop "
                     "the other writer or choose another logging.run_dir")


def _acquire_without_flock(run_dir: Path, path: Path, me: Holder, log: Callable[[str], None]) -> None:
    """No flock on this filesystem: the file's content decides (see the module docstring)."""
    try:
        previous = Holder.parse(path.read_text())
    except OSError:
        previous = None
    if previous is not None and previous.pid != os.getpid():
        alive = previous.alive_here()
        if alive is None:
            raise RunDirBusy(f"run dir {run_dir} is in use by {previous.describe()} (this filesystem has no file "
                             f"locks, so whether it still runs cannot be checked from here): wait for it, or if no "
                             f"run uses this dir any more delete {path}; or choose another logging.run_dir")
        if alive:
            raise RunDirBusy(_busy(run_dir, previous))
        log(f"run dir {run_dir}: took over the stale lock of {previous.describe()} (that process is gone)")
    path.write_text(me.to_json())


def _busy(run_dir: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder is not None else "another process (it has not written its name yet)"
    stop = f" (kill -TERM {holder.pid} stops it after its current step)" if holder and holder.pid else ""
    if holder is not None and holder.alive_here() is False:  # a child it forked still has the file open
        stop = (f" (pid {holder.pid} is gone, but a process it started holds the lock: "
                f"`fuser -v {run_dir / LOCK_NAME}` finds it)")
    return (f"run dir {run_dir} is in use by {who}: one run writes a run dir at a time. Wait for it to finish "
            f"or stop it{stop}, or choose another logging.run_dir")


def _command() -> str:
    """This process's command line as a user would type it: `mopd train ...` for the CLI however it was started
    (the `mopd` script, `python -m mopd.cli`), else the program's name and arguments."""
    argv0 = Path(sys.argv[0] if sys.argv and sys.argv[0] else "python")
    prog = "mopd" if argv0.name == "mopd" or "mopd" in argv0.parts[:-1] else (
        argv0.parent.name if argv0.name == "__main__.py" else argv0.name)
    return shlex.join([prog, *sys.argv[1:]])[:300]


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _read(fd: int) -> Holder | None:
    try:
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    return Holder.parse(data.decode("utf-8", "replace")) if data.strip() else None


def _write(fd: int, holder: Holder) -> None:
    data = holder.to_json().encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
