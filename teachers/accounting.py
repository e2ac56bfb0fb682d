"""Per-teacher accounting of a step's scoring: which teacher scored how many tokens, how long its engine
spent, and what a teacher pool paid in swaps. With many teachers the cost of a step is spread over them
unevenly; these are the figures that say which teacher (or which swap) the step waited for.

Metric names (in the step record): `teacher/<name>/tokens`, `teacher/<name>/token_share`,
`teacher/<name>/staleness_mean` (how many policy versions the samples it scored lag the one that trains on
them: `rollout/staleness_mean` per teacher, `teacher_staleness`), `timing_s/teacher/<name>` (engine seconds
scoring, summed over its calls), `pool/swaps`, `timing_s/pool_swap` (engine seconds loading weights, summed),
and per pool `pool/<pool>/swaps`, `pool/<pool>/hit_rate` (the share of the pool's scoring calls whose teacher
was already resident: the LRU cache's hit rate, 1.0 when nothing swapped) and `pool/<pool>/resident/<name>`
(1 when an engine of the pool holds it after the step's scoring was submitted).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from teachers.pool import PooledTeacherHandle, TeacherPool


def call_stats(scores: Any) -> dict[str, float]:
    """What one scoring call's answer says about its cost (teachers.vllm_teacher.ScoreBatch); zeros for a
    backend that returns a plain list."""
    return {"score_s": float(getattr(scores, "score_s", 0.0)), "swaps": float(bool(getattr(scores, "swapped", False))),
            "swap_s": float(getattr(scores, "swap_s", 0.0)), "calls": 1.0}


def add_stats(into: dict[str, dict[str, float]], name: str, stats: dict[str, float]) -> None:
    acc = into.setdefault(name, {})
    for k, v in stats.items():
        acc[k] = acc.get(k, 0.0) + v


def teacher_metrics(stats: dict[str, dict[str, float]], tokens: dict[str, int],
                    teachers: dict[str, list[Any]]) -> dict[str, float]:
    """The step record's per-teacher and pool entries from the calls' `stats` (teacher -> summed
    `call_stats`) and the response `tokens` each teacher scored."""
    total = sum(tokens.values())
    out: dict[str, float] = {}
    for name, n in sorted(tokens.items()):
        out[f"teacher/{name}/tokens"] = float(n)
        out[f"teacher/{name}/token_share"] = n / total if total else 0.0
    for name, s in sorted(stats.items()):
        out[f"timing_s/teacher/{name}"] = s.get("score_s", 0.0)
    pools = pools_of(teachers)
    if pools:
        out["pool/swaps"] = sum(s.get("swaps", 0.0) for s in stats.values())
        out["timing_s/pool_swap"] = sum(s.get("swap_s", 0.0) for s in stats.values())
        for pool in pools:
            mine = [stats[n] for n in pool.teachers if n in stats]
            swaps, calls = sum(s.get("swaps", 0.0) for s in mine), sum(s.get("calls", 0.0) for s in mine)
            out[f"pool/{pool.name}/swaps"] = swaps
            if calls:
                out[f"pool/{pool.name}/hit_rate"] = 1.0 - swaps / calls
            for name in pool.teachers:
                out[f"pool/{pool.name}/resident/{name}"] = float(name in pool.resident)
    return out


def teacher_staleness(lags: Iterable[tuple[str | None, int]]) -> dict[str, float]:
    """`teacher/<name>/staleness_mean` from (teacher, policy-version lag) per sample: with a pool and
    `trainer.max_staleness >= 1` a teacher that waits for its swap must not be the one whose samples are
    stale, and this is where that shows. Samples no teacher scored are left out."""
    by: dict[str, list[int]] = {}
    for name, lag in lags:
        if name is not None:
            by.setdefault(name, []).append(lag)
    return {f"teacher/{n}/staleness_mean": sum(v) / len(v) for n, v in sorted(by.items())}


def pools_of(teachers: dict[str, list[Any]]) -> list[TeacherPool]:
    """The teacher pools behind `teachers`' handles, each once, in teacher order."""
    seen: dict[int, TeacherPool] = {}
    for reps in teachers.values():
        for h in reps:
            if isinstance(h, PooledTeacherHandle):
                seen.setdefault(id(h.pool), h.pool)
    return list(seen.values())


def scoring_order(teachers: dict[str, list[Any]], names: Iterable[str]) -> list[str]:
    """The order a step's teachers are submitted in: dedicated teachers as given; each pool's teachers resident
    ones first (they score while the others wait for a swap), in the order given otherwise."""
    names = list(names)
    order = [n for n in names if not any(isinstance(h, PooledTeacherHandle) for h in teachers.get(n, []))]
    for pool in pools_of({n: teachers[n] for n in names if n in teachers}):
        order += pool.order([n for n in names if n in pool.teachers])
    return order
