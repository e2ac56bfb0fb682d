"""Ray actor shells over the in-process engine classes: the same code runs with or without a cluster.

Each engine actor runs its vLLM engine in-process with its own OpenMP thread count, so several engines
on one small machine do not all spin every core.
"""

from __future__ import annotations

from typing import Any

import ray

from rollout.types import EngineSpec
from rollout.vllm_engine import StudentEngine
from rollout.vllm_env import vllm_env


def engine_actor(cls: type, spec: EngineSpec, scheduling: Any = None) -> Any:
    """`cls` as a Ray actor sized by `spec`; `scheduling`: where it runs (a placement-group bundle), None
    lets Ray pick any node."""
    return ray.remote(cls).options(
        num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, scheduling_strategy=scheduling,
        max_restarts=spec.max_restarts, max_task_retries=0,  # a student must be re-synced before it samples again
        runtime_env={"env_vars": vllm_env(spec.omp_threads)},
    )


def at(scheduling: list[Any] | None, i: int) -> Any:
    return scheduling[i] if scheduling else None


def start_student_engines(spec: EngineSpec, num_engines: int, scheduling: list[Any] | None = None) -> list[Any]:
    """`num_engines` student engines, engine i seeded `spec.seed + i`; `scheduling`: one placement strategy
    per engine (see `mopd.placement`), or None. Not waited on: call `ready` on them."""
    return [engine_actor(StudentEngine, spec, at(scheduling, i)).remote(
        spec.model_path, **{**spec.engine_kwargs(), "seed": spec.seed + i}, capture_routing=spec.capture_routing)
            for i in range(num_engines)]
