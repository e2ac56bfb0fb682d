"""The JSONL metrics file, the run's record of truth: one line per step, appended with `os.write` (looped
until every byte is out) + fsync.

A crash between steps never tears a line, but a full disk can: the write that fails is undone (the file
is truncated back to where the line began) when the disk allows it, and raised as an OSError naming the
file. Whatever is left is tolerated by the readers: a resumed run drops undecodable lines (with a warning
naming their line numbers) and every line past its checkpoint, so the file never holds a step twice;
`read_metrics` skips undecodable lines with a warning. The file is created 0644.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from mopd.atomic import FILE_MODE, write_all, write_text


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def _parse(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """(raw line, record) for each decodable line, and the 1-based numbers of undecodable ones."""
    good: list[tuple[str, dict[str, Any]]] = []
    bad: list[int] = []
    for i, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode()
            rec = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            bad.append(i)
            continue
        if not isinstance(rec, dict):
            bad.append(i)
            continue
        good.append((line, rec))
    return good, bad


def _warn_bad(path: Path, bad: list[int], what: str) -> None:
    if bad:
        lines = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
        warnings.warn(f"{path}: {what} {len(bad)} undecodable line(s) (line {lines}; a torn write, e.g. on a "
                      "full disk)", RuntimeWarning, stacklevel=3)


def _step(rec: dict[str, Any]) -> float:
    s = rec.get("step", 0)
    return s if isinstance(s, (int, float)) else 0


class JsonlSink:
    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            good, bad = _parse(self.path)
            _warn_bad(self.path, bad, "dropped")
            keep = [ln for ln, rec in good if _step(rec) <= resume_step]
            if bad or len(keep) != len(good) or not self.path.read_bytes().endswith(b"\n"):
                write_text(self.path, "".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        line = json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}, sort_keys=False)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            start = os.fstat(fd).st_size
            try:
                write_all(fd, (line + "\n").encode(), self.path)
                os.fsync(fd)
            except OSError as e:
                try:
                    os.ftruncate(fd, start)  # take back a partial line
                except OSError:
                    pass
                why = os.strerror(e.errno) if e.errno else str(e)
                raise OSError(e.errno, f"could not record step {step} in {self.path}: {why}") from e
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics file; undecodable (torn) lines are skipped with a RuntimeWarning."""
    path = Path(path)
    good, bad = _parse(path)
    _warn_bad(path, bad, "skipped")
    return [rec for _, rec in good]
