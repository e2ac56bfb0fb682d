"""Stage timings under verl's names (`timing_s/<stage>`): one context manager instead of hand-paired
`perf_counter` calls, so a stage cannot be timed twice or forgotten."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(stage: str, metrics: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in the block to `metrics["timing_s/<stage>"]` (even if it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        key = f"timing_s/{stage}"
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - t0
