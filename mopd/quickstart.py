"""The quickstart round: build (or reuse) the world, start engine actors, roll out and score once."""

from __future__ import annotations

import time

from mopd.config import MopdConfig
from mopd.report import round_table


def prepare_world(cfg: MopdConfig) -> dict | None:
    """Build the quickstart world when the config points into it (cached after the first build)."""
    from pathlib import Path

    paths = [cfg.student.path, *(t.path for t in cfg.teachers.values())]
    if not any(Path(p).resolve().is_relative_to(Path(cfg.world.dir).resolve()) for p in paths):
        return None
    from mopd.world.build import build_world

    return build_world(cfg.world)


def run_round(cfg: MopdConfig) -> dict[str, dict[str, float]]:
    from transformers import AutoTokenizer

    from mopd.engines import start_engines
    from mopd.evaluate import eval_rows, evaluate
    from mopd.ray_cluster import init_ray
    from teachers.registry import TeacherRegistry

    t0 = time.perf_counter()
    prepare_world(cfg)
    print(f"world ready in {time.perf_counter() - t0:.1f} s")
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
    registry = TeacherRegistry.from_config(cfg, tokenizer)
    rows = eval_rows(cfg)
    for r in rows:
        registry.teacher_for(r["domain"], r["id"])
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.host, log_to_driver=cfg.ray.log_to_driver)
    engines = start_engines(cfg, registry)
    print(f"engines up in {engines.startup_s:.1f} s: {engines.engine_startup_s}")
    t1 = time.perf_counter()
    summary = evaluate(cfg, engines, registry, tokenizer, rows)
    print(f"rollout + teacher scoring of {len(rows)} prompts in {time.perf_counter() - t1:.1f} s")
    print(round_table(summary))
    engines.shutdown()
    return summary
