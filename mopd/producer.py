"""The batch producer: sample prompts -> roll out on the student engines -> verify -> score with each
domain's teacher -> padded batch. The step loop pulls one `StepBatch` per step and never sees the actors.

Samples go out to the engines in contiguous chunks (one call per engine), come back in order, are
grouped by the teacher registered for their domain and scored in one call per teacher replica.
Batch `s` is a pure function of (seed, s), so a resumed run draws exactly the batches the interrupted
one would have.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import ray

from mopd.batch import TrainBatch, build_batch
from mopd.config import MopdConfig
from mopd.data import DomainMixSampler
from mopd.objectives import get_objective
from mopd.samples import ScoredSample
from mopd.timing import timed
from rewards.verifiers import verify
from rollout.actors import split_evenly
from rollout.types import Sample
from teachers.registry import TeacherRegistry


@dataclass
class StepBatch:
    step: int  # the step this batch is for (1-based, as logged)
    samples: list[ScoredSample]
    batch: TrainBatch
    row_ids: list[str]
    metrics: dict[str, float] = field(default_factory=dict)  # timing_s/rollout, timing_s/teacher

    @property
    def digest(self) -> int:
        return batch_digest(self.row_ids)


class BatchProducer:
    """Everything a step needs before the trainer: the only place that talks to engine actors per step."""

    def __init__(self, cfg: MopdConfig, students: list[Any], teachers: dict[str, list[Any]],
                 registry: TeacherRegistry, tokenizer: Any, rows: list[dict], prompt_ids: list[list[int]]) -> None:
        self.cfg, self.students, self.teachers, self.registry = cfg, students, teachers, registry
        self.tokenizer, self.rows, self.prompt_ids = tokenizer, rows, prompt_ids
        self.sampler = DomainMixSampler(rows, cfg.data.domain_mix, cfg.trainer.seed)
        self.objective = get_objective(cfg.algorithm.objective)

    def get(self, step: int) -> StepBatch:
        """The batch for `step` (1-based): its prompts and rollout seed depend on (seed, step) only."""
        r, t = self.cfg.rollout, self.cfg.trainer
        idx = self.sampler.batch(step - 1, t.prompts_per_step)
        ids, rows = [self.prompt_ids[i] for i in idx], [self.rows[i] for i in idx]
        seed = t.seed * 1_000_003 + (step - 1) * 10_007
        metrics: dict[str, float] = {}
        with timed("rollout", metrics):
            if self.objective.teacher_samples:  # baseline: the teachers generate, the student imitates
                samples = teacher_rollout(self.teachers, self.registry, ids, rows, n=r.n, temperature=r.temperature,
                                          max_tokens=r.max_tokens, seed=seed)
            else:
                samples = rollout(self.students, ids, rows, n=r.n, temperature=r.temperature, top_p=r.top_p,
                                  max_tokens=r.max_tokens, seed=seed)
        verify_samples(samples, self.tokenizer)
        with timed("teacher", metrics):
            if self.objective.needs_teacher_scores:
                score_with_teachers(self.teachers, self.registry, samples, top_k=self.cfg.algorithm.teacher_top_k)
        batch = build_batch(samples, self.tokenizer.pad_token_id)
        return StepBatch(step, samples, batch, [row["id"] for row in rows], metrics)


def batch_digest(row_ids: list[str]) -> int:
    """A short fingerprint of a step's prompts, so resumed runs can be checked for the same data order."""
    return int(hashlib.sha256(",".join(row_ids).encode()).hexdigest()[:12], 16)


def rollout(engines: list[Any], prompt_ids: list[list[int]], rows: list[dict], *, n: int, temperature: float,
            top_p: float, max_tokens: int, seed: int) -> list[ScoredSample]:
    chunks = split_evenly(list(range(len(prompt_ids))), len(engines))
    futures = [eng.generate.remote([prompt_ids[i] for i in ch], n=n, temperature=temperature, top_p=top_p,
                                   max_tokens=max_tokens, seed=seed + (ch[0] if ch else 0) * 7919)
               for eng, ch in zip(engines, chunks, strict=True) if ch]
    groups: list[list[Sample]] = [g for res in ray.get(futures) for g in res]
    return [ScoredSample(row=rows[i], group=i, sample=s) for i, g in enumerate(groups) for s in g]


def teacher_rollout(teachers: dict[str, list[Any]], registry: TeacherRegistry, prompt_ids: list[list[int]],
                    rows: list[dict], *, n: int, temperature: float, max_tokens: int, seed: int) -> list[ScoredSample]:
    """Samples from each row's teacher instead of the student: the off-policy SFT baseline's data."""
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
                        top_k: int = 0) -> None:
    """Fill each sample's teacher log-probs: one call per teacher replica, all in flight at once."""
    by_teacher = registry.group([s.domain for s in samples], [s.row["id"] for s in samples])
    pending = []
    for name, idx in by_teacher.items():
        replicas = teachers[name]
        for actor, part in zip(replicas, split_evenly(idx, len(replicas)), strict=True):
            if not part:
                continue
            seqs = [samples[i].sample.prompt_ids + samples[i].sample.response_ids for i in part]
            plens = [len(samples[i].sample.prompt_ids) for i in part]
            pending.append((name, part, actor.score.remote(seqs, plens, top_k)))
    for name, part, fut in pending:
        try:
            scores = ray.get(fut)
        except ray.exceptions.RayActorError:
            raise  # the replica died: the loop restarts it and redoes the step
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"teacher '{name}' failed to score {len(part)} samples: {e}") from e
        for i, sc in zip(part, scores, strict=True):
            samples[i].teacher = name
            samples[i].teacher_logprobs = sc.logprobs
            samples[i].teacher_topk_ids = sc.topk_ids
            samples[i].teacher_topk_logprobs = sc.topk_logprobs


def verify_samples(samples: list[ScoredSample], tokenizer: Any) -> None:
    """Decode responses and score those whose row carries an answer (see `rewards.verifiers` for which
    verifier a row gets)."""
    for s in samples:
        s.text = tokenizer.decode(s.sample.response_ids, skip_special_tokens=True)
        if s.row.get("answer") is not None:
            s.score = verify(s.domain, s.text, str(s.row["answer"]), s.row.get("verifier"))


