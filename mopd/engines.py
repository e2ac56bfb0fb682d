"""Start the engine actors a run needs (student rollout engines and one actor group per teacher)
from the config, and wait until every engine is up so start-up failures surface before step 1."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mopd.config import MopdConfig
from mopd.placement import Placement, reserve
from rollout.actors import start_student_engines, start_teacher
from teachers.registry import TeacherRegistry


@dataclass
class Engines:
    students: list[Any]
    teachers: dict[str, list[Any]]
    startup_s: float
    engine_startup_s: dict[str, float]
    placement: Placement | None = None  # the run's placement group, removed at shutdown

    def shutdown(self) -> None:
        import ray

        for a in self.students + [a for reps in self.teachers.values() for a in reps]:
            ray.kill(a)
        if self.placement is not None:
            self.placement.remove()


def max_model_len(cfg: MopdConfig) -> int:
    """Engine context: the longest prompt plus the longest response plus the one token a teacher's
    scoring request generates; refused up front if a model cannot hold it."""
    from transformers import AutoConfig

    from mopd.config import ConfigError

    need = cfg.data.max_prompt_tokens + cfg.rollout.max_tokens + 1
    # A server teacher's context is its server's (checked by the teacher preflight), not its `path`'s.
    local = [(f"teacher '{n}'", t.path) for n, t in cfg.teachers.items() if t.backend != "vllm_server"]
    for name, path in [("student", cfg.student.path), *local]:
        limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        if limit is not None and need > limit:
            raise ConfigError(
                f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) + rollout.max_tokens ({cfg.rollout.max_tokens}) "
                f"+ 1 = {need} exceeds the {name}'s max_position_embeddings={limit}; lower one of them")
    return need


def start_engines(cfg: MopdConfig, registry: TeacherRegistry, placement: Placement | None = None) -> Engines:
    """Engines in their placement-group bundles; without `placement` (no trainer in this run) a group
    holding only the engines' bundles is reserved here."""
    import ray

    t0 = time.perf_counter()
    r = cfg.rollout
    mml = max_model_len(cfg)
    placement = placement or reserve(cfg, trainer=False)
    students = start_student_engines(
        cfg.student.path, num_engines=r.num_engines, max_model_len=mml, dtype=r.dtype or cfg.student.dtype,
        seed=cfg.trainer.seed, enforce_eager=r.enforce_eager, num_cpus=r.num_cpus_per_engine,
        num_gpus=r.num_gpus_per_engine, omp_threads=r.omp_threads, kv_cache_gb=r.kv_cache_gb,
        gpu_memory_utilization=r.gpu_memory_utilization,
        capture_routing=cfg.algorithm.r3 or cfg.algorithm.r3_capture, scheduling=placement.strategies("student"))
    teachers = start_teachers(cfg, registry, placement, mml)
    names = [f"student[{i}]" for i in range(len(students))] + [
        f"{n}[{i}]" for n, reps in teachers.items() for i in range(len(reps))]
    actors = students + [a for reps in teachers.values() for a in reps]
    try:
        info = ray.get([a.ready.remote() for a in actors])
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"an engine failed to start: {e}") from e
    return Engines(students, teachers, time.perf_counter() - t0,
                   {n: round(i["startup_s"], 2) for n, i in zip(names, info, strict=True)}, placement)


def start_teachers(cfg: MopdConfig, registry: TeacherRegistry, placement: Placement,
                   mml: int | None = None) -> dict[str, list[Any]]:
    """One actor per replica and teacher: a vLLM engine in its bundle (backend vllm), or a client of
    one `vllm serve` URL that reserves nothing (backend vllm_server). Not waited on here."""
    from teachers.openai_server import start_server_teacher

    r = cfg.rollout
    mml = mml or max_model_len(cfg)
    out: dict[str, list[Any]] = {}
    for name, spec in registry.teachers.items():
        if cfg.teachers[name].backend == "vllm_server":
            out[name] = start_server_teacher(name, cfg.teachers[name])
            continue
        out[name] = start_teacher(
            spec.path, replicas=spec.replicas, max_model_len=mml, dtype=spec.dtype,
            max_top_k=cfg.algorithm.teacher_top_k, enforce_eager=r.enforce_eager,
            **placement.plan.actor_resources(f"teacher:{name}"), omp_threads=r.omp_threads, kv_cache_gb=r.kv_cache_gb,
            gpu_memory_utilization=r.gpu_memory_utilization, scheduling=placement.strategies(f"teacher:{name}"))
    return out
