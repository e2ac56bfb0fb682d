"""Memory of a run's processes: the driver, the trainer actor and every engine actor, each on its own
line, and the sum, because one process's RSS says little about a run spread over a dozen processes.

`perf/mem_gb/<process>` is that process's peak RSS; `perf/pss_gb/total` sums the proportional set size
(shared pages split between the processes that share them) over the whole run: on a private cluster the
driver's whole process tree (Ray's own daemons included), otherwise the actors it holds.
"""

from __future__ import annotations

import resource
from typing import Any

import psutil
import ray


def process_memory() -> dict[str, float]:
    """This process: peak RSS and current PSS (RSS where PSS cannot be read), in GB."""
    proc = psutil.Process()
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "pss_gb": _pss(proc) / 1024**3}


def _pss(proc: psutil.Process) -> float:
    try:
        return float(proc.memory_full_info().pss)
    except (psutil.Error, AttributeError):
        try:
            return float(proc.memory_info().rss)
        except psutil.Error:
            return 0.0


def _actor_memory(_self: Any) -> dict[str, float]:
    return process_memory()


def run_memory(actors: dict[str, Any], private_cluster: bool) -> dict[str, float]:
    """`perf/mem_gb/<name>` for the driver and each named actor, their sum, and the run's summed PSS."""
    mine = process_memory()
    unique: dict[Any, str] = {}  # teachers sharing one actor (an hf actor group) are one process
    for n, a in actors.items():
        unique.setdefault(a._actor_id, n)
    names = list(unique.values())
    # __ray_call__ runs a function in any actor without a method of its own for it.
    got = ray.get([actors[n].__ray_call__.remote(_actor_memory) for n in names])
    out = {"perf/mem_gb/driver": mine["peak_rss_gb"]}
    out.update({f"perf/mem_gb/{n}": g["peak_rss_gb"] for n, g in zip(names, got, strict=True)})
    out["perf/mem_gb/total"] = sum(v for k, v in out.items() if k.startswith("perf/mem_gb/"))
    if private_cluster:
        me = psutil.Process()
        out["perf/pss_gb/total"] = sum(_pss(p) for p in [me, *me.children(recursive=True)]) / 1024**3
    else:
        out["perf/pss_gb/total"] = mine["pss_gb"] + sum(g["pss_gb"] for g in got)
    return out
