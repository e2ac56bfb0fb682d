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
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from mopd.batch import TrainBatch, build_batch
from mopd.config import MopdConfig
from mopd.data import AutoMix, DomainMixSampler
from mopd.multiturn import TurnLimits, has_env, length_metrics, multi_turn_rollout
from mopd.objectives import get_objective
from mopd.samples import ScoredSample
from mopd.timing import timed
from rewards.verifiers import verify
from rollout.types import Sample
from teachers.accounting import add_stats, call_stats, scoring_order, teacher_metrics, teacher_staleness
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
        """`data/batch_digest`: the sampled tokens and the teachers' scores, not only which rows."""
        return batch_digest(self.samples)

    @property
    def rows_digest(self) -> int:
        """`data/rows_digest`: which rows, in order (the data order alone)."""
        return rows_digest(self.row_ids)


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
        # Multi-turn batches (rows naming an `env`) roll out in a thread of their own per batch, so that the
        # pipeline can launch the next batch while this one's turns go on (mopd/multiturn.py).
        self.turns = TurnLimits.of(cfg.rollout)
        self._multi_turn = ThreadPoolExecutor(max_workers=cfg.trainer.max_staleness + 2,
                                              thread_name_prefix="mopd-multiturn")

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
        if has_env(rows):
            job = Inflight(step, ids, rows, seed, time.perf_counter(), [], [])
            job.multi_turn = self._multi_turn.submit(
                multi_turn_rollout, self.students, self.tokenizer, ids, rows, n=r.n, temperature=r.temperature,
                top_p=r.top_p, limits=self.turns, seed=seed, metrics=job.multi_turn_metrics)
            return job
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
                                          temperature=r.temperature, max_tokens=r.max_tokens, seed=job.seed,
                                          tokenizer=self.tokenizer, limits=self.turns)
            verify_samples(samples, self.tokenizer)
            return self._batch(job, samples, metrics)
        if job.multi_turn is not None:
            return self._finish_multi_turn(job, between)
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

    def _finish_multi_turn(self, job: Inflight, between: Callable[[], None] | None) -> StepBatch:
        """A multi-turn batch: wait for its rollout thread (polling `between`), then score every trajectory
        with its teacher in one prefill of prompt + whole response each."""
        assert job.multi_turn is not None
        while True:
            try:
                samples = job.multi_turn.result(timeout=None if between is None else 0.01)
                break
            except TimeoutError:
                assert between is not None
                between()
        metrics: dict[str, float] = {"timing_s/rollout": time.perf_counter() - job.t_submit,
                                     **job.multi_turn_metrics}
        verify_samples(samples, self.tokenizer)
        t0 = time.perf_counter()
        if self.objective.needs_teacher_scores:
            calls = submit_scores(self.teachers, self.registry, samples, self.cfg.algorithm.teacher_top_k)
            pending = [fut for _, _, fut in calls]
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=None if between is None else 0.01)
                if between is not None:
                    between()
            collect_scores(samples, calls)
        metrics["timing_s/teacher"] = time.perf_counter() - t0 if self.objective.needs_teacher_scores else 0.0
        return self._batch(job, samples, metrics)

    def _batch(self, job: Inflight, samples: list[ScoredSample], metrics: dict[str, float]) -> StepBatch:
        # Staleness: how many optimizer steps the sampling policy is behind the one that trains on the batch
        # (version step - 1); 0 in the synchronous loop.
        versions = [x.sample.policy_version for x in samples if x.sample.policy_version is not None]
        if versions and not self.objective.teacher_samples:
            lag = [job.step - 1 - v for v in versions]
            metrics["rollout/staleness_mean"] = sum(lag) / len(lag)
            metrics["rollout/staleness_max"] = float(max(lag))
            metrics.update(teacher_staleness((x.teacher, job.step - 1 - x.sample.policy_version) for x in samples
                                             if x.sample.policy_version is not None))
        metrics.update(length_metrics([x.sample for x in samples]))
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
    multi_turn: Future | None = None  # a multi-turn batch's rollout thread (then futures/chunks are empty)
    multi_turn_metrics: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Bounded-staleness batch pipeline: the rollouts and teacher scoring of the next batches run in a
    background thread while the trainer steps on the current one.

    The rule that bounds staleness (verl's one-step-off with k = 1): the rollout of batch j is submitted only
    after the update to policy version j - 1 - k has been submitted to the engines. An engine serves its
    requests in the order the driver submitted them, so every sample of batch j is drawn by version
    >= j - 1 - k, while version j - 1 trains on it: at most k steps stale. k = 0 is the synchronous loop
    (batch j waits for version j - 1). The engines' log-probs of the sampled tokens (mu) are the behaviour
    policy, so IcePop/TIS correct the staleness. Batches are still a function of (seed, step) only.
    Their samples are not: they depend on the weights that drew them, so a checkpoint of step N keeps the
    batches already drawn for N+1..N+k (`ahead`, `mopd.carry`) and a new pipeline serves them first (`ready`).

    The other side of the rule (`drawn_before`): the update to version j - k is submitted only once batch j
    has been drawn, so batch j is drawn by version j - 1 - k exactly. A single-turn batch is one engine call
    per engine, submitted at launch, so the engines' order already gives that once it is launched; a
    multi-turn batch submits a call per turn as its environments answer, and a later turn must not meet a
    newer policy (its samples would depend on the timing of the trainer's steps: neither exact on resume nor
    within the staleness the step records)."""

    def __init__(self, producer: BatchProducer, max_staleness: int, first_step: int, synced_version: int,
                 last_step: int, ready: dict[int, StepBatch] | None = None) -> None:
        self.producer, self.k, self.last_step = producer, max_staleness, last_step
        self.cond = threading.Condition()
        self.synced = synced_version  # the newest policy version submitted to the engines
        # `ready`: batches of steps first_step.. produced before (a checkpoint's or a fault's carry, sampled by
        # older policies): served as they are, and production starts after them.
        ready = {s: b for s, b in (ready or {}).items() if s >= first_step}
        while first_step in ready:
            first_step += 1
        self.next_launch = first_step
        self.launched: deque[Inflight] = deque()
        self.rounds: dict[int, Future] = {}  # launched multi-turn rollouts by step (drawn_before waits on them)
        self.done: dict[int, StepBatch | BaseException] = dict(ready)
        self.taken: dict[int, StepBatch] = {}  # served by get() and not yet known to stand (see salvage)
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

    def drawn_before(self, version: int) -> float:
        """Wait until batch version + k, which policy version - 1 draws, has been drawn, so the update to
        `version` may go to the engines (class doc); returns the seconds waited. No wait once the pipeline
        closed or failed (the loop recovers), for a batch past the last step or carried in (`ready`)."""
        step = version + self.k
        if self.k == 0 or step > self.last_step:
            return 0.0
        t0 = time.perf_counter()
        with self.cond:
            self.cond.wait_for(lambda: step < self.next_launch or self.closed or self.error is not None)
            rounds = self.rounds.pop(step, None)
        while rounds is not None and not rounds.done():
            with self.cond:
                if self.closed or self.error is not None:
                    break
            futures_wait([rounds], timeout=0.05)
        return time.perf_counter() - t0

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
        self.taken = {s: b for s, b in self.taken.items() if s > step - 2 - self.k}
        self.taken[step] = got
        waited = time.perf_counter() - t0
        teacher = got.metrics.get("timing_s/teacher", 0.0)
        metrics["timing_s/wait_teacher"] = min(waited, teacher)
        metrics["timing_s/wait_rollout"] = waited - metrics["timing_s/wait_teacher"]
        return got

    def ahead(self, step: int) -> dict[int, StepBatch]:
        """The batches of steps step+1..step+k (up to the last step), waiting for those still being produced:
        after step `step`, these were sampled by policies older than `step`'s, so a checkpoint of `step` must
        hold them to continue exactly. Empty when the pipeline failed or closed before producing them."""
        want = range(step + 1, min(step + self.k, self.last_step) + 1)
        with self.cond:
            self.cond.wait_for(lambda: all(s in self.done for s in want) or self.error is not None or self.closed)
            got = {s: self.done.get(s) for s in want}
        if any(not isinstance(b, StepBatch) for b in got.values()):
            return {}
        return got  # type: ignore[return-value]

    def salvage(self, after: int) -> dict[int, StepBatch]:
        """After a fault: every batch of a step after `after` produced whole before it (served or not), so a
        redone step trains on the samples it would have trained on."""
        with self.cond:
            out = {s: b for s, b in {**self.taken, **self.done}.items() if s > after and isinstance(b, StepBatch)}
        return dict(sorted(out.items()))

    def close(self) -> None:
        """Stop submitting; the batch being produced finishes in the background (daemon thread)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=60)

    def _launch_allowed(self) -> None:
        with self.cond:
            while not self.closed and self.may_launch(self.next_launch) and len(self.launched) <= self.k:
                job = self.producer.launch(self.next_launch)
                self.launched.append(job)
                if getattr(job, "multi_turn", None) is not None:
                    self.rounds[self.next_launch] = job.multi_turn
                self.next_launch += 1
                for old in [s for s in self.rounds if s < self.next_launch - self.k - 2]:
                    del self.rounds[old]

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


def rows_digest(row_ids: list[str]) -> int:
    """A short fingerprint of a step's prompts, so resumed runs can be checked for the same data order."""
    return int(hashlib.sha256(",".join(row_ids).encode()).hexdigest()[:12], 16)


def batch_digest(samples: list[ScoredSample]) -> int:
    """A short fingerprint of what a step trains on: each sample's row, prompt and response token ids, the
    engine's log-probs (which policy sampled it), the teacher's scores and, for multi-turn samples, which tokens
    are the student's, bit for bit. Two runs whose steps agree here trained on the same data; equal row ids
    alone do not show it (a redone step can resample)."""
    h = hashlib.sha256()
    for s in samples:
        smp = s.sample
        h.update(f"{s.row['id']}|{s.group}|{s.teacher}|".encode())
        for ids in (smp.prompt_ids, smp.response_ids):
            h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        for lp in (smp.rollout_logprobs, s.teacher_logprobs):
            h.update(np.asarray(lp, dtype=np.float64).tobytes() + b"|")
        if s.teacher_topk_ids is not None and s.teacher_topk_logprobs is not None:
            h.update(np.ascontiguousarray(s.teacher_topk_ids, dtype=np.int64).tobytes()
                     + np.ascontiguousarray(s.teacher_topk_logprobs, dtype=np.float64).tobytes())
        if smp.student_mask is not None:  # who wrote each token (multi-turn): the trainer's mask depends on it
            h.update(b"m" + np.asarray(smp.student_mask, dtype=np.int8).tobytes())
        h.update(b";")
    return int(h.hexdigest()[:12], 16)


def rollout(engines: list[Any], prompt_ids: list[list[int]], rows: list[dict], *, n: int, temperature: float,
            top_p: float, max_tokens: int, seed: int, tokenizer: Any = None,
            limits: TurnLimits | None = None) -> list[ScoredSample]:
    """Samples of `rows` (evaluation); rows naming an environment are rolled out multi-turn, which needs the
    student's `tokenizer` (observations) and the rollout section's `limits` (default: max_tokens per turn)."""
    if has_env(rows):
        if tokenizer is None:
            raise ValueError("rows naming an environment need the student's tokenizer to roll out multi-turn")
        return multi_turn_rollout(engines, tokenizer, prompt_ids, rows, n=n, temperature=temperature, top_p=top_p,
                                  limits=limits or TurnLimits(max_tokens), seed=seed)
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
                    rows: list[dict], *, n: int, temperature: float, max_tokens: int, seed: int, tokenizer: Any = None,
                    limits: TurnLimits | None = None) -> list[ScoredSample]:
    """Samples from each row's teacher instead of the student: the off-policy SFT baseline's data and the
    teachers' own evaluation. Rows naming an environment are rolled out multi-turn with the tool, as the
    student's are, through the same environment loop (every backend with `generate_turns`: vllm, hf,
    vllm_server; needs the student's `tokenizer` and the rollout `limits`)."""
    by_teacher = registry.group([r["domain"] for r in rows], [r["id"] for r in rows])
    pending = []
    out: list[ScoredSample] = []
    for name, idx in by_teacher.items():
        multi = [i for i in idx if rows[i].get("env")]
        if multi:
            out += _teacher_multi_turn(name, teachers[name], [prompt_ids[i] for i in multi], [rows[i] for i in multi],
                                       multi, n=n, temperature=temperature, seed=seed, tokenizer=tokenizer,
                                       limits=limits or TurnLimits(max_tokens))
            idx = [i for i in idx if not rows[i].get("env")]
        for actor, part in zip(teachers[name], contiguous_chunks(idx, len(teachers[name])), strict=True):
            if part:
                pending.append((name, part, actor.generate.remote([prompt_ids[i] for i in part], n=n,
                                                                  temperature=temperature, max_tokens=max_tokens,
                                                                  seed=seed + part[0] * 7919)))
    for name, part, fut in pending:
        for i, group in zip(part, ray.get(fut), strict=True):
            out.extend(ScoredSample(row=rows[i], group=i, sample=s, teacher=name) for s in group)
    return sorted(out, key=lambda s: s.group)


def _teacher_multi_turn(name: str, actors: list[Any], prompt_ids: list[list[int]], rows: list[dict], where: list[int],
                        *, n: int, temperature: float, seed: int, tokenizer: Any, limits: TurnLimits) -> list[ScoredSample]:
    if tokenizer is None:
        raise ValueError("rows naming an environment need the student's tokenizer to roll out multi-turn")
    try:
        for a in actors:
            a.generate_turns  # noqa: B018 - the vllm, hf and vllm_server backends have it; a backend of yours may not
    except AttributeError:
        raise ValueError(f"teacher '{name}' cannot roll out rows that name an environment: its backend's actors have "
                         "no generate_turns (the vllm, hf and vllm_server backends do); use one of them or drop those "
                         "rows' env") from None
    samples = multi_turn_rollout(actors, tokenizer, prompt_ids, rows, n=n, temperature=temperature, top_p=1.0,
                                 limits=limits, seed=seed + where[0] * 7919)
    for s in samples:
        s.group, s.teacher = where[s.group], name
    return samples


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
            if samples[i].sample.student_mask is not None:
                mask_student_positions(samples[i])
    return stats


def mask_student_positions(s: ScoredSample) -> None:
    """Keep the teacher's scores at the student's positions of a multi-turn trajectory only: the teacher read
    the observations in its one prefill of the whole trajectory (they condition its later predictions), but
    its log-probs *of* observation tokens are no training signal (0.0 and an empty top-k, ids -1, there; the
    trainer's mask leaves those positions out too)."""
    mask = s.sample.student_mask_or_ones()
    s.teacher_logprobs = [lp if m else 0.0 for lp, m in zip(s.teacher_logprobs, mask, strict=True)]
    if s.teacher_topk_ids is not None and s.teacher_topk_logprobs is not None:
        obs_R = ~np.asarray(mask, dtype=bool)
        s.teacher_topk_ids, s.teacher_topk_logprobs = s.teacher_topk_ids.copy(), s.teacher_topk_logprobs.copy()
        s.teacher_topk_ids[obs_R] = -1
        s.teacher_topk_logprobs[obs_R] = -np.inf


def scored_tokens(samples: list[ScoredSample]) -> dict[str, int]:
    """Student-written response tokens each teacher scored: an observation's tokens are prefilled but carry
    no score the loss uses, so they count for no teacher's share."""
    out: dict[str, int] = {}
    for s in samples:
        if s.teacher is not None:
            out[s.teacher] = out.get(s.teacher, 0) + int(sum(s.sample.student_mask_or_ones()))
    return out


def verify_samples(samples: list[ScoredSample], tokenizer: Any) -> None:
    """Decode responses and score those whose row carries an answer (see `rewards.verifiers` for which
    verifier a row gets)."""
    for s in samples:
        s.text = tokenizer.decode(s.sample.response_ids, skip_special_tokens=True)
        if s.row.get("answer") is not None:
            s.score = verify(s.domain, s.text, str(s.row["answer"]), s.row.get("verifier"))
        if s.sample.meta.get("env_reward") is not None:  # the environment's own outcome reward wins
            s.score = float(s.sample.meta["env_reward"])


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
