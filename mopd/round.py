"""One rollout + teacher-scoring round: the part of a step that runs on the engine actors.

Samples go out to the student engines in contiguous chunks, come back in order, are grouped by the
teacher registered for their domain and scored in one batch per teacher (spread over its replicas).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout.actors import split_evenly
from rollout.types import Sample
from teachers.registry import TeacherRegistry


@dataclass
class ScoredSample:
    row: dict
    group: int  # index of its prompt in the batch (GRPO groups)
    sample: Sample
    teacher: str = ""
    teacher_logprobs: list[float] = field(default_factory=list)
    teacher_topk_ids: list[list[int]] = field(default_factory=list)
    teacher_topk_logprobs: list[list[float]] = field(default_factory=list)
    text: str = ""
    score: float | None = None

    @property
    def domain(self) -> str:
        return self.row["domain"]


def rollout(engines: list[Any], prompt_ids: list[list[int]], rows: list[dict], *, n: int, temperature: float,
            top_p: float, max_tokens: int, seed: int) -> list[ScoredSample]:
    import ray

    chunks = split_evenly(list(range(len(prompt_ids))), len(engines))
    futures = [eng.generate.remote([prompt_ids[i] for i in ch], n=n, temperature=temperature, top_p=top_p,
                                   max_tokens=max_tokens, seed=seed + (ch[0] if ch else 0) * 7919)
               for eng, ch in zip(engines, chunks, strict=True) if ch]
    groups: list[list[Sample]] = [g for res in ray.get(futures) for g in res]
    return [ScoredSample(row=rows[i], group=i, sample=s) for i, g in enumerate(groups) for s in g]


def teacher_rollout(teachers: dict[str, list[Any]], registry: TeacherRegistry, prompt_ids: list[list[int]],
                    rows: list[dict], *, n: int, temperature: float, max_tokens: int, seed: int) -> list[ScoredSample]:
    """Samples from each row's teacher instead of the student: the off-policy SFT baseline's data."""
    import ray

    by_teacher = registry.group([r["domain"] for r in rows], [r["id"] for r in rows])
    pending = []
    for name, idx in by_teacher.items():
        for actor, part in zip(teachers[name], split_evenly(idx, len(teachers[name])), strict=True):
            if part:
                pending.append((name, part, actor.generate.remote([prompt_ids[i] for i in part], n=n,
                                                                  temperature=temperature, max_tokens=max_tokens,
                                                                  seed=seed + part[0] * 7919)))
    out: list[ScoredSample] = []
    for name, part, fut in pending:
        for i, group in zip(part, ray.get(fut), strict=True):
            out.extend(ScoredSample(row=rows[i], group=i, sample=s, teacher=name) for s in group)
    return sorted(out, key=lambda s: s.group)


def score_with_teachers(teachers: dict[str, list[Any]], registry: TeacherRegistry, samples: list[ScoredSample],
                        top_k: int = 0) -> dict[str, float]:
    """Fill each sample's teacher log-probs; returns seconds spent per teacher."""
    import ray

    by_teacher = registry.group([s.domain for s in samples], [s.row["id"] for s in samples])
    pending = []
    for name, idx in by_teacher.items():
        replicas = teachers[name]
        for actor, part in zip(replicas, split_evenly(idx, len(replicas)), strict=True):
            if not part:
                continue
            seqs = [samples[i].sample.prompt_ids + samples[i].sample.response_ids for i in part]
            plens = [len(samples[i].sample.prompt_ids) for i in part]
            pending.append((name, part, time.perf_counter(), actor.score.remote(seqs, plens, top_k)))
    timing: dict[str, float] = {}
    for name, part, t0, fut in pending:
        try:
            scores = ray.get(fut)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"teacher '{name}' failed to score {len(part)} samples: {e}") from e
        timing[name] = max(timing.get(name, 0.0), time.perf_counter() - t0)
        for i, sc in zip(part, scores, strict=True):
            samples[i].teacher = name
            samples[i].teacher_logprobs = sc.logprobs
            samples[i].teacher_topk_ids = sc.topk_ids
            samples[i].teacher_topk_logprobs = sc.topk_logprobs
    return timing


def verify_samples(samples: list[ScoredSample], tokenizer: Any) -> None:
    """Decode responses and score those whose row carries an answer with the domain's exact verifier."""
    from rewards.verifiers import VERIFIERS, verify

    for s in samples:
        s.text = tokenizer.decode(s.sample.response_ids, skip_special_tokens=True)
        if s.row.get("answer") is not None and s.domain in VERIFIERS:
            s.score = verify(s.domain, s.text, str(s.row["answer"]))


def domain_summary(samples: list[ScoredSample]) -> dict[str, dict[str, float]]:
    """Per domain: verifier accuracy and mean teacher KL (log mu - log pi_teacher over response tokens)."""
    out: dict[str, dict[str, float]] = {}
    for d in sorted({s.domain for s in samples}):
        ss = [s for s in samples if s.domain == d]
        scored = [s.score for s in ss if s.score is not None]
        diffs = [m - t for s in ss for m, t in zip(s.sample.rollout_logprobs, s.teacher_logprobs, strict=False)]
        out[d] = {
            "acc": float(np.mean(scored)) if scored else float("nan"),
            "teacher_kl": float(np.mean(diffs)) if diffs else float("nan"),
            "samples": float(len(ss)),
            "response_length": float(np.mean([len(s.sample.response_ids) for s in ss])),
        }
    return out
