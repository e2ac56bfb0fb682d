"""Evaluation through the real engines: greedy accuracy per domain from the student engine, mean teacher
KL on the student's own temperature-1 samples scored by each domain's teacher, and each teacher's own
greedy accuracy on its domains (the "teacher" column of the result table, measured on the same rows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import AutoTokenizer

from mopd.config import MopdConfig
from mopd.data import encode_rows, load_rows
from mopd.engine_group import EngineGroup, start_engines
from mopd.multiturn import TurnLimits
from mopd.producer import rollout, score_with_teachers, teacher_rollout, verify_samples
from mopd.ray_cluster import init_ray
from mopd.report import round_table
from mopd.samples import domain_summary
from teachers.registry import TeacherRegistry


def eval_rows(cfg: MopdConfig, log: Callable[[str], None] | None = None) -> list[dict]:
    """The first `data.eval_size_per_domain` rows of each domain, in file order (a fixed eval set)."""
    rows, seen = [], {}
    for r in load_rows(cfg.data.eval_files, cfg.data.dedupe, log):
        if seen.get(r["domain"], 0) < cfg.data.eval_size_per_domain:
            rows.append(r)
            seen[r["domain"]] = seen.get(r["domain"], 0) + 1
    return rows


def evaluate(cfg: MopdConfig, engines: EngineGroup, registry: TeacherRegistry, tokenizer: Any,
             rows: list[dict], seed: int = 1234, prompt_ids: list[list[int]] | None = None) -> dict[str, dict[str, float]]:
    """`prompt_ids`: the rows' encoded prompts when the caller has them (a run encodes its eval set once)."""
    prompt_ids = prompt_ids or encode_rows(tokenizer, rows, cfg.data.max_prompt_tokens, cfg.data.add_special_tokens)
    r = cfg.rollout
    turns = {"tokenizer": tokenizer, "limits": TurnLimits.of(r)}  # rows naming an env roll out multi-turn
    greedy = rollout(engines.students, prompt_ids, rows, n=1, temperature=r.eval_temperature, top_p=1.0,
                     max_tokens=r.max_tokens, seed=seed, **turns)
    verify_samples(greedy, tokenizer)
    sampled = rollout(engines.students, prompt_ids, rows, n=1, temperature=1.0, top_p=1.0,
                      max_tokens=r.max_tokens, seed=seed, **turns)
    score_with_teachers(engines.teachers, registry, sampled)
    acc = domain_summary(greedy)
    kl = domain_summary(sampled)
    out = {d: {"acc": acc[d]["acc"], "teacher_kl": kl[d]["teacher_kl"],
               "response_length": kl[d]["response_length"], "prompts": acc[d]["samples"]} for d in acc}
    return out


def evaluate_teachers(cfg: MopdConfig, engines: EngineGroup, registry: TeacherRegistry, tokenizer: Any,
                      rows: list[dict], seed: int = 1234, prompt_ids: list[list[int]] | None = None) -> dict[str, float]:
    """Each domain's teacher, decoding greedily (rollout.eval_temperature) on the eval rows of its domains."""
    prompt_ids = prompt_ids or encode_rows(tokenizer, rows, cfg.data.max_prompt_tokens, cfg.data.add_special_tokens)
    samples = teacher_rollout(engines.teachers, registry, prompt_ids, rows, n=1,
                              temperature=cfg.rollout.eval_temperature, max_tokens=cfg.rollout.max_tokens, seed=seed,
                              tokenizer=tokenizer, limits=TurnLimits.of(cfg.rollout))
    verify_samples(samples, tokenizer)
    return {d: s["acc"] for d, s in domain_summary(samples).items()}


def run_round(cfg: MopdConfig, log=print) -> dict[str, dict[str, float]]:
    """`mopd round`: start the engines, roll out and score the eval set once, print the per-domain table."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
    registry = TeacherRegistry.from_config(cfg, tokenizer)
    rows = eval_rows(cfg)
    for r in rows:
        registry.teacher_for(r["domain"], r["id"])
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.host, log_to_driver=cfg.ray.log_to_driver)
    engines = start_engines(cfg, registry)
    try:
        log(f"engines up in {engines.startup_s:.1f} s: {engines.engine_startup_s}")
        t1 = time.perf_counter()
        summary = evaluate(cfg, engines, registry, tokenizer, rows)
        log(f"rollout + teacher scoring of {len(rows)} prompts in {time.perf_counter() - t1:.1f} s")
        log(round_table(summary))
    finally:
        engines.shutdown()
    return summary
