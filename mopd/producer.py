"""The batch producer: sample prompts -> roll out on the student engines -> verify -> score with each
domain's teacher -> padded batch. The step loop pulls one `StepBatch` per step and never sees the actors.

Samples go out to the engines in contiguous chunks (one call per engine), come back in order, are
grouped by the teacher registered for their domain and scored in one call per teacher replica.
Batch `s` is a pure function of (seed, s), so a resumed run draws exactly the batches the interrupted
one would have.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from mopd.batch import TrainBatch, build_batch
from mopd.config import MopdConfig
from mopd.data import AutoMix, DomainMixSampler
from mopd.objectives import get_objective
from mopd.samples import ScoredSample
from mopd.timing import timed
from rewards.verifiers import verify
from rollout.types import Sample
from teachers.accounting import add_stats, call_stats, scoring_order, teacher_metrics
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
        am = cfg.data.auto_mix  # refused by the config where the objective measures no teacher KL
        self.auto_mix = (AutoMix(self.sampler.domains, self.sampler.weights, am.ema, am.floor,
                                 cfg.trainer.max_staleness) if am.enabled else None)

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Step `step` has trained: its per-domain teacher KL steers later batches (data.auto_mix)."""
        if self.auto_mix is not None:
            self.auto_mix.observe(step, metrics)

    def mix_metrics(self, step: int) -> dict[str, float]:
        """`data/mix/<domain>`: the sampling weights batch `step` was drawn with (data.auto_mix)."""
        if self.auto_mix is None:
            return {}
        return {f"data/mix/{d}": float(w) for d, w in zip(self.sampler.domains, self.auto_mix.weights_for(step),
                                                          strict=True)}

    def get(self, step: int) -> StepBatch:
        """The batch for `step` (1-based), produced now: its prompts and rollout seed depend on (seed, step) only."""
        return self.finish(self.launch(step))

    def launch(self, step: int) -> Inflight:
        """Submit the rollout of `step`'s batch to the engines and return at once. The engines sample with the
        weights they hold when they reach the request: those of the last update submitted before it."""
        r, t = self.cfg.rollout, self.cfg.trainer
        idx = self.sampler.batch(step - 1, t.prompts_per_step,
                                 None if self.auto_mix is None else self.auto_mix.weights_for(step))
        ids, rows = [self.prompt_ids[i] for i in idx], [self.rows[i] for i in idx]
        seed = t.seed * 1_000_003 + (step - 1) * 10_007
        if self.objective.teacher_samples:  # baseline: the teachers generate, the student imitates
            return Inflight(step, ids, rows, seed, time.perf_counter(), [], [])
        futures, chunks = submit_rollout(self.students, ids, n=r.n, temperature=r.temperature, top_p=r.top_p,
                                         max_tokens=r.max_tokens, seed=seed)
        return Inflight(step, ids, rows, seed, time.perf_counter(), futures, chunks)

    def finish(self, job: Inflight, between: Callable[[], None] | None = None) -> StepBatch:
        """Wait for `job`'s rollout and score it. Teacher scoring streams: each engine's chunk goes to its
        teachers as soon as it is back, while the other chunks still generate. `between` runs while waiting
        (the pipeline uses it to submit the next rollouts the moment they are allowed)."""
        r = self.cfg.rollout
        metrics: dict[str, float] = {}
        if self.objective.teacher_samples:
            with timed("rollout", metrics):
                samples = teacher_rollout(self.teachers, self.registry, job.prompt_ids, job.rows, n=r.n,
                                          temperature=r.temperature, max_tokens=r.max_tokens, seed=job.seed)
            verify_samples(samples, self.tokenizer)
            return self._batch(job, samples, metrics)
        timeout = None if between is None else 0.01  # a pipeline polls, to submit rollouts the moment they may go
        parts: dict[int, list[ScoredSample]] = {}
        scoring: list[tuple[list[ScoredSample], list[tuple[str, list[int], Any]]]] = []
        pending, t_first = list(job.futures), None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            for fut in ready:
                k = job.futures.index(fut)
                parts[k] = [ScoredSample(row=job.rows[i], group=i, sample=smp)
                            for i, g in zip(job.chunks[k], ray.get(fut), strict=True) for smp in g]
                verify_samples(parts[k], self.tokenizer)
                if self.objective.needs_teacher_scores:
                    t_first = t_first or time.perf_counter()
                    scoring.append((parts[k], submit_scores(self.teachers, self.registry, parts[k],
                                                            self.cfg.algorithm.teacher_top_k)))
            if between is not None:
                between()
        t_rolled = time.perf_counter()
        metrics["timing_s/rollout"] = t_rolled - job.t_submit
        if scoring:
            calls = [fut for _, part_calls in scoring for _, _, fut in part_calls]
            while calls:
                _, calls = ray.wait(calls, num_returns=len(calls), timeout=timeout)
                if between is not None:
                    between()
            stats: dict[str, dict[str, float]] = {}
            for part, part_calls in scoring:
                for name, s in collect_scores(part, part_calls).items():
                    add_stats(stats, name, s)
            scored = [x for part, _ in scoring for x in part]
            metrics.update(teacher_metrics(stats, scored_tokens(scored), self.teachers))
        metrics["timing_s/teacher"] = time.perf_counter() - (t_first or t_rolled) if scoring else 0.0
        return self._batch(job, [x for k in sorted(parts) for x in parts[k]], metrics)

    def _batch(self, job: Inflight, samples: list[ScoredSample], metrics: dict[str, float]) -> StepBatch:
        # Staleness: how many optimizer steps the sampling policy is behind the one that trains on the batch
        # (version step - 1); 0 in the synchronous loop.
        versions = [x.sample.policy_version for x in samples if x.sample.policy_version is not None]
        if versions and not self.objective.teacher_samples:
            lag = [job.step - 1 - v for v in versions]
            metrics["rollout/staleness_mean"] = sum(lag) / len(lag)
            metrics["rollout/staleness_max"] = float(max(lag))
        batch = build_batch(samples, self.tokenizer.pad_token_id)
        return StepBatch(job.step, samples, batch, [row["id"] for row in job.rows], metrics)


@dataclass
class Inflight:
    """A batch whose rollout has been submitted (`BatchProducer.launch`)."""

    step: int
    prompt_ids: list[list[int]]
    rows: list[dict]
    seed: int
    t_submit: float
    futures: list[Any]
    chunks: list[list[int]]


class Pipeline:
    """Bounded-staleness batch pipeline: the rollouts and teacher scoring of the next batches run in a
    background thread while the trainer steps on the current one.

    The rule that bounds staleness (verl's one-step-off with k = 1): the rollout of batch j is submitted only
    after the update to policy version j - 1 - k has been submitted to the engines. An engine serves its
    requests in the order the driver submitted them, so every sample of batch j is drawn by version
    >= j - 1 - k, while version j - 1 trains on it: at most k steps stale. k = 0 is the synchronous loop
    (batch j waits for version j - 1). The engines' log-probs of the sampled tokens (mu) are the behaviour
    policy, so IcePop/TIS correct the staleness. Batches are still a function of (seed, step) only.
    """

    def __init__(self, producer: BatchProducer, max_staleness: int, first_step: int, synced_version: int,
                 last_step: int) -> None:
        self.producer, self.k, self.last_step = producer, max_staleness, last_step
        self.cond = threading.Condition()
        self.synced = synced_version  # the newest policy version submitted to the engines
        self.next_launch = first_step
        self.launched: deque[Inflight] = deque()
        self.done: dict[int, StepBatch | BaseException] = {}
        self.error: BaseException | None = None  # the thread itself failed (not one batch)
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="mopd-pipeline", daemon=True)
        self.thread.start()

    def may_launch(self, step: int) -> bool:
        return may_launch(step, self.synced, self.k) and step <= self.last_step

    def weights_sent(self, version: int) -> None:
        """The update to policy `version` has been submitted to every engine."""
        with self.cond:
            self.synced = max(self.synced, version)
            self.cond.notify_all()

    def get(self, step: int, metrics: dict[str, float]) -> StepBatch:
        """Batch `step`, waiting for it if needed (`timing_s/wait_rollout`, `timing_s/wait_teacher`: how long
        the step waited for each stage, the part of those stages the pipeline did not hide)."""
        t0 = time.perf_counter()
        with self.cond:
            self.cond.wait_for(lambda: step in self.done or self.error is not None)
            got = self.done.pop(step) if step in self.done else self.error
            assert got is not None
        if isinstance(got, BaseException):
            raise got
        waited = time.perf_counter() - t0
        teacher = got.metrics.get("timing_s/teacher", 0.0)
        metrics["timing_s/wait_teacher"] = min(waited, teacher)
        metrics["timing_s/wait_rollout"] = waited - metrics["timing_s/wait_teacher"]
        return got

    def close(self) -> None:
        """Stop submitting; the batch being produced finishes in the background (daemon thread)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=60)

    def _launch_allowed(self) -> None:
        with self.cond:
            while not self.closed and self.may_launch(self.next_launch) and len(self.launched) <= self.k:
                self.launched.append(self.producer.launch(self.next_launch))
                self.next_launch += 1

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as e:  # noqa: BLE001  (raised by get() in the step loop)
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _produce(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or self.launched or self.may_launch(self.next_launch))
                if self.closed:
                    return
            self._launch_allowed()
            with self.cond:
                job = self.launched.popleft() if self.launched else None
            if job is None:
                continue
            try:
                result: StepBatch | BaseException = self.producer.finish(job, between=self._launch_allowed)
            except BaseException as e:  # noqa: BLE001  (the step loop raises it, and recovers)
                result = e
            with self.cond:
                self.done[job.step] = result
                self.cond.notify_all()
                if isinstance(result, BaseException):
                    self.closed = True  # the loop rebuilds the pipeline after recovering
                    return


def may_launch(step: int, synced_version: int, max_staleness: int) -> bool:
    """Whether batch `step`'s rollout may be submitted once policy `synced_version` has been sent: its samples
    are then at most `max_staleness` versions behind version step - 1, which trains on them."""
    return synced_version >= step - 1 - max_staleness


def batch_digest(row_ids: list[str]) -> int:
    """A short fingerprint of a step's prompts, so resumed runs can be checked for the same data order."""
    return int(hashlib.sha256(",".join(row_ids).encode()).hexdigest()[:12], 16)


def rollout(engines: list[Any], prompt_ids: list[list[int]], rows: list[dict], *, n: int, temperature: float,
            top_p: float, max_tokens: int, seed: int) -> list[ScoredSample]:
    futures, _ = submit_rollout(engines, prompt_ids, n=n, temperature=temperature, top_p=top_p,
                                max_tokens=max_tokens, seed=seed)
    groups: list[list[Sample]] = [g for res in ray.get(futures) for g in res]
    return [ScoredSample(row=rows[i], group=i, sample=s) for i, g in enumerate(groups) for s in g]


def submit_rollout(engines: list[Any], prompt_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                   max_tokens: int, seed: int) -> tuple[list[Any], list[list[int]]]:
    """One generate call per engine over a contiguous chunk of the prompts, submitted without waiting:
    `(futures, chunks)`, the prompt indices of each call, in order (engines without a prompt get none)."""
    chunks = contiguous_chunks(list(range(len(prompt_ids))), len(engines))
    futures = [eng.generate.remote([prompt_ids[i] for i in ch], n=n, temperature=temperature, top_p=top_p,
                                   max_tokens=max_tokens, seed=seed + (ch[0] if ch else 0) * 7919)
               for eng, ch in zip(engines, chunks, strict=True) if ch]
    return futures, [ch for ch in chunks if ch]


def teacher_rollout(teachers: dict[str, list[Any]], registry: TeacherRegistry, prompt_ids: list[list[int]],
                    rows: list[dict], *, n: int, temperature: float, max_tokens: int, seed: int) -> list[ScoredSample]:
    """Samples from each row's teacher instead of the student: the off-policy SFT baseline's data."""
    by_teacher = registry.group([r["domain"] for r in rows], [r["id"] for r in rows])
    pending = []
    for name, idx in by_teacher.items():
        for actor, part in zip(teachers[name], contiguous_chunks(idx, len(teachers[name])), strict=True):
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
    collect_scores(samples, submit_scores(teachers, registry, samples, top_k))


def submit_scores(teachers: dict[str, list[Any]], registry: TeacherRegistry, samples: list[ScoredSample],
                  top_k: int = 0) -> list[tuple[str, list[int], Any]]:
    """Submit the scoring of `samples` by their domains' teachers (one call per replica); returns the calls."""
    by_teacher = registry.group([s.domain for s in samples], [s.row["id"] for s in samples])
    pending = []
    for name in scoring_order(teachers, by_teacher):  # pooled teachers: resident ones first
        idx, replicas = by_teacher[name], teachers[name]
        for actor, part in zip(replicas, contiguous_chunks(idx, len(replicas)), strict=True):
            if not part:
                continue
            seqs = [samples[i].sample.prompt_ids + samples[i].sample.response_ids for i in part]
            plens = [len(samples[i].sample.prompt_ids) for i in part]
            pending.append((name, part, actor.score.remote(seqs, plens, top_k)))
    return pending


def collect_scores(samples: list[ScoredSample], pending: list[tuple[str, list[int], Any]]) -> dict[str, dict[str, float]]:
    """Wait for `submit_scores`' calls and fill the samples' teacher fields; returns what the calls cost per
    teacher (teachers.accounting.call_stats, summed)."""
    stats: dict[str, dict[str, float]] = {}
    for name, part, fut in pending:
        try:
            scores = ray.get(fut)
        except ray.exceptions.RayActorError:
            raise  # the replica died: the loop restarts it and redoes the step
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"teacher '{name}' failed to score {len(part)} samples: {e}") from e
        add_stats(stats, name, call_stats(scores))
        for i, sc in zip(part, scores, strict=True):
            samples[i].teacher = name
            samples[i].teacher_logprobs = sc.logprobs
            samples[i].teacher_topk_ids = sc.topk_ids
            samples[i].teacher_topk_logprobs = sc.topk_logprobs
    return stats


def scored_tokens(samples: list[ScoredSample]) -> dict[str, int]:
    """Response tokens each teacher scored."""
    out: dict[str, int] = {}
    for s in samples:
        if s.teacher is not None:
            out[s.teacher] = out.get(s.teacher, 0) + len(s.sample.response_ids)
    return out


def verify_samples(samples: list[ScoredSample], tokenizer: Any) -> None:
    """Decode responses and score those whose row carries an answer (see `rewards.verifiers` for which
    verifier a row gets)."""
    for s in samples:
        s.text = tokenizer.decode(s.sample.response_ids, skip_special_tokens=True)
        if s.row.get("answer") is not None:
            s.score = verify(s.domain, s.text, str(s.row["answer"]), s.row.get("verifier"))


def contiguous_chunks(items: list, parts: int) -> list[list]:
    """Contiguous chunks, sizes differing by at most one, so results concatenate back in order (one chunk
    per engine or replica)."""
    k, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out
