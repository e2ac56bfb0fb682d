"""Evaluation round through the real engines: greedy accuracy per domain from the student engine,
and mean teacher KL on the student's own temperature-1 samples scored by each domain's teacher."""

from __future__ import annotations

from typing import Any

from mopd.config import MopdConfig
from mopd.data import encode_rows, load_rows
from mopd.engines import Engines
from mopd.round import domain_summary, rollout, score_with_teachers, verify_samples
from teachers.registry import TeacherRegistry


def eval_rows(cfg: MopdConfig) -> list[dict]:
    """The first `data.eval_size_per_domain` rows of each domain, in file order (a fixed eval set)."""
    rows, seen = [], {}
    for r in load_rows(cfg.data.eval_files):
        if seen.get(r["domain"], 0) < cfg.data.eval_size_per_domain:
            rows.append(r)
            seen[r["domain"]] = seen.get(r["domain"], 0) + 1
    return rows


def evaluate(cfg: MopdConfig, engines: Engines, registry: TeacherRegistry, tokenizer: Any,
             rows: list[dict], seed: int = 1234) -> dict[str, dict[str, float]]:
    prompt_ids = encode_rows(tokenizer, rows, cfg.data.max_prompt_tokens)
    r = cfg.rollout
    greedy = rollout(engines.students, prompt_ids, rows, n=1, temperature=r.eval_temperature, top_p=1.0,
                     max_tokens=r.max_tokens, seed=seed)
    verify_samples(greedy, tokenizer)
    sampled = rollout(engines.students, prompt_ids, rows, n=1, temperature=1.0, top_p=1.0,
                      max_tokens=r.max_tokens, seed=seed)
    score_with_teachers(engines.teachers, registry, sampled)
    acc = domain_summary(greedy)
    kl = domain_summary(sampled)
    out = {d: {"acc": acc[d]["acc"], "teacher_kl": kl[d]["teacher_kl"],
               "response_length": kl[d]["response_length"], "prompts": acc[d]["samples"]} for d in acc}
    return out
