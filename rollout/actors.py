"""Ray actor shells over the in-process engine classes: the same code runs with or without a cluster.

Each engine actor runs its vLLM engine in-process with its own OpenMP thread count, so several engines
on one small machine do not all spin every core.
"""

from __future__ import annotations

from typing import Any

from rollout.vllm_env import vllm_env


def _actor(cls: type, num_cpus: float, num_gpus: float, omp_threads: int, kv_cache_gb: int,
           scheduling: Any = None) -> Any:
    """`scheduling`: where the actor runs (a placement-group bundle); None lets Ray pick any node."""
    import ray

    return ray.remote(cls).options(
        num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=scheduling,
        runtime_env={"env_vars": vllm_env(omp_threads, kv_cache_gb)},
    )


def _at(scheduling: list[Any] | None, i: int) -> Any:
    return scheduling[i] if scheduling else None


def start_student_engines(model_path: str, *, num_engines: int, max_model_len: int, dtype: str, seed: int,
                          enforce_eager: bool, num_cpus: float, num_gpus: float, omp_threads: int,
                          kv_cache_gb: int, gpu_memory_utilization: float, capture_routing: bool = False,
                          scheduling: list[Any] | None = None) -> list[Any]:
    """`scheduling`: one placement strategy per engine (see `mopd.placement`), or None."""
    from rollout.vllm_engine import StudentEngine

    return [_actor(StudentEngine, num_cpus, num_gpus, omp_threads, kv_cache_gb, _at(scheduling, i)).remote(
        model_path, dtype=dtype, max_model_len=max_model_len, seed=seed + i, enforce_eager=enforce_eager,
        gpu_memory_utilization=gpu_memory_utilization, omp_threads=omp_threads, kv_cache_gb=kv_cache_gb,
        capture_routing=capture_routing)
            for i in range(num_engines)]


def start_teacher(model_path: str, *, replicas: int, max_model_len: int, dtype: str, max_top_k: int,
                  enforce_eager: bool, num_cpus: float, num_gpus: float, omp_threads: int, kv_cache_gb: int,
                  gpu_memory_utilization: float, scheduling: list[Any] | None = None) -> list[Any]:
    from teachers.vllm_teacher import TeacherEngine

    return [_actor(TeacherEngine, num_cpus, num_gpus, omp_threads, kv_cache_gb, _at(scheduling, i)).remote(
        model_path, dtype=dtype, max_model_len=max_model_len, max_top_k=max_top_k, enforce_eager=enforce_eager,
        gpu_memory_utilization=gpu_memory_utilization, omp_threads=omp_threads, kv_cache_gb=kv_cache_gb)
            for i in range(replicas)]


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous chunks, sizes differing by at most one, so results concatenate back in order."""
    k, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out
