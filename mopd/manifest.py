"""The teacher manifest every checkpoint holds (`state.json` -> `teachers`): per teacher its domains, backend,
path and a content hash of its files (weights, config, tokenizer), so a resumed run knows it distils from the
teachers the run started with. `--resume` with a changed teacher is refused naming what changed, unless
`--allow-teacher-change`.

The hash is sha256 of each file's bytes: sound (a re-exported teacher with the same names and sizes is caught),
and cached by (path, size, mtime) in `~/.cache/mopd/file_hashes.json` (or `$MOPD_CACHE_DIR`), so a teacher of
hundreds of GB is read once, not at every start. A teacher served by someone else (`vllm_server`) is known by
its URLs and served model; its `path` (the tokenizer source) is hashed like any folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from mopd.atomic import write_text
from mopd.config import MopdConfig

_CHUNK = 16 << 20


class TeacherChangedError(ValueError):
    """`--resume` found teachers other than the checkpoint's; the message names what changed and the flag."""


def _cache_file() -> Path:
    root = os.environ.get("MOPD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mopd"
    return Path(root) / "file_hashes.json"


class _HashCache:
    def __init__(self) -> None:
        self.path = _cache_file()
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.dirty = False

    def sha256(self, f: Path) -> str:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.known:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
            self.known[key] = h.hexdigest()
            self.dirty = True
        return self.known[key]

    def save(self) -> None:
        if self.dirty:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_text(self.path, json.dumps(self.known))
            except OSError:
                pass  # a cache: the next start hashes again


def folder_hashes(folder: Path, cache: _HashCache | None = None) -> dict[str, str]:
    """sha256 of every file under a model folder (hidden ones, e.g. a hub download's `.cache`, excluded)."""
    own = cache is None
    cache = cache or _HashCache()
    out = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and not any(p.startswith(".") for p in rel.parts):
            out[rel.as_posix()] = cache.sha256(f)
    if own:
        cache.save()
    return out


def teacher_manifest(cfg: MopdConfig) -> dict[str, dict]:
    """`{teacher: {domains, backend, path, sha256, files, urls?, served_model?}}` for this config's teachers.
    `sha256` (over the folder's per-file hashes) is None for a path that is not a local folder (a hub id)."""
    cache = _HashCache()
    out: dict[str, dict] = {}
    for name, t in cfg.teachers.items():
        entry: dict = {"domains": list(t.domains), "backend": str(t.backend), "path": str(t.path)}
        folder = Path(str(t.path)).expanduser()
        files = folder_hashes(folder, cache) if folder.is_dir() else {}
        entry["files"] = files
        entry["sha256"] = (hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
                           if folder.is_dir() else None)
        if t.urls:
            entry["urls"], entry["served_model"] = list(t.urls), t.served_model
        out[name] = entry
    cache.save()
    return out


def manifest_changes(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """What differs between a checkpoint's manifest and this run's, one phrase per change (empty: same)."""
    out = []
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            out.append(f"teacher '{name}' (domains {saved[name]['domains']}) is gone")
            continue
        if name not in saved:
            out.append(f"teacher '{name}' (domains {now[name]['domains']}) is new")
            continue
        a, b = saved[name], now[name]
        for key in ("domains", "backend", "path", "urls", "served_model"):
            if a.get(key) != b.get(key):
                out.append(f"teacher '{name}': {key} {a.get(key)!r} -> {b.get(key)!r}")
        if a.get("sha256") != b.get("sha256") and a.get("path") == b.get("path"):
            fa, fb = a.get("files", {}), b.get("files", {})
            diff = [f"{f} {'removed' if f not in fb else 'added' if f not in fa else 'changed'}"
                    for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]
            out.append(f"teacher '{name}': the files under {b['path']} changed ({', '.join(diff[:4])}"
                       f"{', ...' if len(diff) > 4 else ''})")
    return out


def check_teachers(saved: dict | None, now: dict[str, dict], ck_name: str, allow: bool,
                   log: Callable[[str], None] = print) -> None:
    """Refuse a resume whose teachers differ from checkpoint `ck_name`'s (`saved`), unless `allow`."""
    if saved is None:
        log(f"{ck_name} has no teacher manifest (written by an older mopd): the teachers are not checked")
        return
    changes = manifest_changes(saved, now)
    if not changes:
        return
    if allow:
        log(f"--allow-teacher-change: resuming {ck_name} with changed teachers: {'; '.join(changes)}")
        return
    raise TeacherChangedError(f"--resume: the teachers changed since checkpoint {ck_name}: {'; '.join(changes)}. "
                              "Restore them, or pass --allow-teacher-change to continue with the new ones")
