"""Metrics sinks. The JSONL file is the source of truth: one line per step, each written with a single
`write` + fsync so a crash never leaves a torn line; a resumed run first drops lines past its
checkpoint so the file never holds a step twice."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mopd.atomic import write_text


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class JsonlSink:
    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
            write_text(self.path, "".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        line = json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}, sort_keys=False)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def make_sinks(names: list[str], run_dir: Path, resume_step: int | None, cfg: Any = None) -> list[Any]:
    """One sink per name; `cfg` (the resolved MopdConfig) gives W&B/MLflow their settings and run params."""
    sinks: list[Any] = []
    for n in names:
        if n == "jsonl":
            sinks.append(JsonlSink(run_dir / "metrics.jsonl", resume_step))
        else:
            from mopd.loggers import make_logger

            sinks.append(make_logger(n, run_dir, cfg, resume_step))
    return sinks
