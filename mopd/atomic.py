"""Atomic file and folder writes: a crash, a full disk or an error in the writer leaves the old version or
the new one, never half of one, and no temporary behind (a killed process can leave a hidden
`.NAME.tmp*` / `.NAME.old` sibling, which `mopd.run_dir` removes at the next start).

Everything is fsynced before it is swapped in, and the parent folder after, so a power cut cannot turn a
swapped-in file into an empty one. Files are created 0644 and folders 0755 (mkstemp/mkdtemp make 0600 and
0700, which would hide checkpoints from other users and containers); `write_dir` sets every file and folder
its `fill` wrote the same way, whatever the writer used (safetensors' writer, under transformers'
`save_pretrained`, leaves `model.safetensors` 0600).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # not supported (some network filesystems): the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _share_tree(root: Path) -> None:
    """Every folder under `root` 0755 and every regular file 0644 (links are left alone)."""
    for dirpath, dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, FILE_MODE)
        for name in dirs:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, DIR_MODE)


def _fsync_tree(root: Path) -> None:
    """fsync every file of a folder tree, then every folder (deepest first)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def write_all(fd: int, data: bytes, path: str | Path) -> None:
    """`os.write` until every byte is out: a short write (a disk filling up) is retried, and the OSError that
    follows (ENOSPC) or a write that makes no progress is raised naming `path`."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as e:
            raise OSError(e.errno, f"writing {path} failed: {e.strerror or e}") from e
        if n <= 0:
            raise OSError(f"writing {path} failed: the write made no progress ({len(view)} bytes left)")
        view = view[n:]


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, text.encode(), path)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, fsync it, then swap it into place.

    Any failure (in `fill`, the fsync or the swap) removes the temporary folder and leaves whatever `path`
    held before in place; the exception propagates unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    old: Path | None = None
    try:
        os.chmod(tmp, DIR_MODE)
        fill(tmp)
        if not tmp.is_dir():
            raise OSError(f"writing {path} failed: its temporary folder {tmp} vanished while it was filled")
        _share_tree(tmp)
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the previous version back
                old = None
            raise
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed at the next start (run_dir)
