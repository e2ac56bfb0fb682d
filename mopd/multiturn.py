"""Multi-turn rollouts: the student generates a turn, the row's environment answers, the answer's tokens are
appended as context, the student goes on (rows naming an `env`, see rollout/envs.py).

Lanes, not lock-step: the trajectories are split into contiguous lanes, one per engine (as single-turn
rollouts). A lane sends the next turn of all its live trajectories in one call, with the whole trajectory so
far as the prompt; when the call comes back, the environment steps of its trajectories whose turn ended on a
stop string run in a thread pool (each through `rollout.envs.run_step`, so a failing, hanging or flooding
environment ends only its own trajectory), and as soon as they have answered the lane sends its next turn,
whatever the other engines are doing. Within one call vLLM returns every sequence together, so a lane's turn
is as long as its longest (the offline engine has no per-request streaming); a trajectory that ended drops out.
`timing_s/env`: per engine, the time it sat idle waiting for its environments (the mean over engines).

Who wrote what: `Sample.student_mask` is 1 on the student's tokens and 0 on observation tokens, whose
`rollout_logprobs` are a 0.0 placeholder. The trainer's mask is response mask x student mask
(mopd/batch.py), so observations get no loss, advantage, teacher term, correction weight or metric.

Observations given as text are tokenized with the student's tokenizer: a tokenizer with a chat template
renders the text as a `tool` message (the part of the template's rendering that the tool message adds after
a user/assistant exchange, which includes the template's own turn markers); a tokenizer without one (the
quickstart world's character tokenizer) or a template that cannot render a tool message gets the plain text.
An environment that needs exact control returns token ids.

Seeds: turn t of trajectory (prompt i, sample j) is sampled with a seed that depends on
(batch seed, i, j, t) only, so a batch is still a function of (seed, step) whatever the engine count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from mopd.samples import ScoredSample
from rollout.envs import ENV, STUDENT, Env, EnvStep, make_env, run_step
from rollout.types import Sample

_ENV_THREADS = 32  # environment steps in flight at once (I/O-bound tools; pure-Python ones are quick)


@dataclass(frozen=True)
class TurnLimits:
    """The rollout section's multi-turn keys (rollout.max_turns, ...), as the loop uses them."""

    max_tokens: int  # per student turn
    max_turns: int = 4
    max_total_tokens: int = 0  # response tokens in all (student + observations); 0: max_tokens
    env_timeout_s: float = 10.0
    env_max_observation_chars: int = 4096

    @classmethod
    def of(cls, rollout_cfg: Any) -> TurnLimits:
        r = rollout_cfg
        return cls(r.max_tokens, r.max_turns, r.max_total_tokens, r.env_timeout_s, r.env_max_observation_chars)

    @property
    def total(self) -> int:
        return max(self.max_tokens, self.max_total_tokens)


@dataclass
class Trajectory:
    """One (prompt, sample) trajectory while it is rolled out."""

    group: int
    row: dict
    prompt_ids: list[int]
    seed: int
    env: Env | None
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    student_mask: list[int] = field(default_factory=list)
    pieces: list[tuple[str, str]] = field(default_factory=list)  # (author, text), the prompt excluded
    turns: int = 0
    tool_calls: int = 0
    outcome: str = ""  # "" while live; then one of rollout.envs.OUTCOMES
    reward: float | None = None
    finish_reason: str = ""
    versions: list[int] = field(default_factory=list)
    routed: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, ids: list[int], logprobs: list[float], student: bool) -> None:
        self.response_ids += ids
        self.logprobs += logprobs if student else [0.0] * len(ids)
        self.student_mask += [int(student)] * len(ids)

    def sample(self) -> Sample:
        meta = {"turns": self.turns, "tool_calls": self.tool_calls, "outcome": self.outcome,
                "env": self.row.get("env"), "obs_tokens": len(self.student_mask) - sum(self.student_mask),
                **({"env_reward": self.reward} if self.reward is not None else {}),
                **({"env_info": self.info} if self.info else {})}
        return Sample(prompt_ids=list(self.prompt_ids), response_ids=self.response_ids,
                      rollout_logprobs=self.logprobs, finish_reason=self.finish_reason, routed_experts=self.routed,
                      meta=meta, policy_version=min(self.versions) if self.versions else None,
                      student_mask=self.student_mask)


def has_env(rows: list[dict]) -> bool:
    """Whether a batch is rolled out multi-turn (a row names an environment); otherwise the single-turn path
    runs, unchanged."""
    return any(r.get("env") for r in rows)


def observation_ids(tokenizer: Any, observation: str | list[int]) -> list[int]:
    """An observation's tokens: ids as given; text as a chat template's tool message, or plain (module doc)."""
    if not isinstance(observation, str):
        return [int(x) for x in observation]
    if getattr(tokenizer, "chat_template", None):
        try:
            base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
            before = tokenizer.apply_chat_template(base, tokenize=False)
            after = tokenizer.apply_chat_template(base + [{"role": "tool", "content": observation}], tokenize=False,
                                                  add_generation_prompt=True)
            if isinstance(before, str) and isinstance(after, str) and after.startswith(before):
                return list(tokenizer.encode(after[len(before):], add_special_tokens=False))
        except Exception:  # noqa: BLE001 - a template without a tool role: plain text below
            pass
    return list(tokenizer.encode(observation, add_special_tokens=False))


def turn_seed(seed: int, prompt: int, sample: int, turn: int) -> int:
    return (seed + prompt * 7919 + sample * 104_729 + turn * 15_485_863) % (2**63 - 1)


def multi_turn_rollout(engines: list[Any], tokenizer: Any, prompt_ids: list[list[int]], rows: list[dict], *,
                       n: int, temperature: float, top_p: float, limits: TurnLimits, seed: int,
                       metrics: dict[str, float] | None = None,
                       between: Callable[[], None] | None = None) -> list[ScoredSample]:
    """`n` trajectories per prompt, rolled out turn by turn (module doc); `metrics` gets the rollout/* and
    timing_s/env figures; `between` runs while the engines generate (the pipeline polls through it)."""
    trajs = [Trajectory(i, row, list(p), seed, make_env(row["env"]) if row.get("env") else None)
             for i, (p, row) in enumerate(zip(prompt_ids, rows, strict=True)) for _ in range(n)]
    index = {id(t): (t.group, k % n) for k, t in enumerate(trajs)}
    k, r = divmod(len(trajs), len(engines))  # contiguous lanes, one per engine, as single-turn rollouts
    bounds = np.cumsum([0] + [k + (i < r) for i in range(len(engines))])
    lanes = [_Lane(eng, trajs[a:b]) for eng, a, b in zip(engines, bounds[:-1], bounds[1:], strict=True) if b > a]
    with ThreadPoolExecutor(max_workers=_ENV_THREADS, thread_name_prefix="mopd-env") as pool:
        for lane in lanes:
            lane.submit(tokenizer, index, temperature, top_p, limits)
        while any(lane.busy for lane in lanes):
            generating = {lane.gen: lane for lane in lanes if lane.gen is not None}
            waiting_env = any(lane.asked for lane in lanes)
            if generating:
                poll = None if between is None and not waiting_env else 0.01
                ready, _ = ray.wait(list(generating), num_returns=1, timeout=poll)
                for ref in ready:
                    generating[ref].turn_back(ray.get(ref), pool, tokenizer, limits)
            elif waiting_env:
                wait([f for lane in lanes for _, f in lane.asked], timeout=0.01, return_when=FIRST_COMPLETED)
            for lane in lanes:
                if lane.gen is None and lane.asked and all(f.done() for _, f in lane.asked):
                    lane.answered(tokenizer, limits)
                    lane.submit(tokenizer, index, temperature, top_p, limits)
            if between is not None:
                between()
    out = [ScoredSample(row=t.row, group=t.group, sample=t.sample()) for t in trajs]
    if metrics is not None:
        metrics.update(trajectory_metrics([s.sample for s in out]))
        metrics["timing_s/env"] = sum(lane.env_s for lane in lanes) / len(lanes)
    return out


@dataclass
class _Lane:
    """One engine's trajectories. A lane goes on to its next turn as soon as its own environments have
    answered: a slow engine or a slow tool holds back only its own lane, never the other engines.
    `env_s`: the time this engine sat idle waiting for its environments after generating."""

    engine: Any
    trajs: list[Trajectory]
    gen: Any = None  # the engine's generate_turns reference while it generates
    asked: list[tuple[Trajectory, Future]] = field(default_factory=list)
    back_at: float = 0.0
    env_s: float = 0.0

    @property
    def busy(self) -> bool:
        return self.gen is not None or bool(self.asked)

    def submit(self, tokenizer: Any, index: dict[int, tuple[int, int]], temperature: float, top_p: float,
               limits: TurnLimits) -> None:
        """The next turn of every live trajectory of the lane, in one call (none left: the lane is done)."""
        self.trajs = [t for t in self.trajs if not t.outcome]
        if not self.trajs:
            return
        self.gen = self.engine.generate_turns.remote(
            [t.prompt_ids + t.response_ids for t in self.trajs],
            max_tokens=[min(limits.max_tokens, limits.total - len(t.response_ids)) for t in self.trajs],
            seeds=[turn_seed(t.seed, *index[id(t)], t.turns) for t in self.trajs],
            stop=[list(t.env.stop) if t.env is not None else [] for t in self.trajs],
            temperature=temperature, top_p=top_p)

    def turn_back(self, samples: list[Sample], pool: ThreadPoolExecutor, tokenizer: Any, limits: TurnLimits) -> None:
        """The turn is written: end the trajectories it ends, step the others' environments in the pool."""
        self.gen, self.back_at = None, time.perf_counter()
        _end_turns(self.trajs, samples, tokenizer, limits)
        self.asked = [(t, pool.submit(run_step, t.env, t.row, list(t.pieces[:-1]), t.pieces[-1][1],
                                      timeout_s=limits.env_timeout_s,
                                      max_observation_chars=limits.env_max_observation_chars))
                      for t in self.trajs if not t.outcome]

    def answered(self, tokenizer: Any, limits: TurnLimits) -> None:
        for t, fut in self.asked:
            _apply_step(t, fut.result(), tokenizer, limits)
        self.asked = []
        self.env_s += time.perf_counter() - self.back_at


def _end_turns(ch: list[Trajectory], samples: list[Sample], tokenizer: Any, limits: TurnLimits) -> None:
    for t, smp in zip(ch, samples, strict=True):
        t.add(smp.response_ids, smp.rollout_logprobs, student=True)
        t.pieces.append((STUDENT, tokenizer.decode(smp.response_ids, skip_special_tokens=True)))
        t.turns += 1
        t.finish_reason = smp.finish_reason
        t.routed = smp.routed_experts  # this turn's record covers every earlier position (its prefill)
        if smp.policy_version is not None:
            t.versions.append(smp.policy_version)
        stopped = smp.meta.get("stop")
        if t.env is None or stopped is None:  # EOS or the length limit: the student is done
            t.outcome = "done" if smp.finish_reason == "stop" else (
                "max_total_tokens" if len(t.response_ids) >= limits.total else "length")
        elif t.turns >= limits.max_turns:
            t.outcome = "max_turns"
        elif len(t.response_ids) >= limits.total:
            t.outcome = "max_total_tokens"


def _apply_step(t: Trajectory, step: EnvStep, tokenizer: Any, limits: TurnLimits) -> None:
    t.tool_calls += int(step.info.get("tool_call", 0))
    if step.reward is not None:
        t.reward = float(step.reward)
    if step.outcome != "ok":
        t.outcome, t.info = step.outcome, dict(step.info)
        return
    if step.observation is None:
        t.outcome = "done"
        return
    ids = observation_ids(tokenizer, step.observation)
    if len(t.response_ids) + len(ids) >= limits.total:  # no room left for the student to read it and go on
        t.outcome = "max_total_tokens"
        return
    t.add(ids, [], student=False)
    text = step.observation if isinstance(step.observation, str) else tokenizer.decode(ids)
    t.pieces.append((ENV, text))


def trajectory_metrics(samples: list[Sample]) -> dict[str, float]:
    """rollout/turns_mean, rollout/tool_calls_mean, rollout/<outcome> (env_error, env_timeout, env_flood:
    shares of trajectories), rollout/obs_token_share (observation tokens / response tokens) of a batch."""
    if not samples:
        return {}
    n = len(samples)
    total = sum(len(s.response_ids) for s in samples)
    obs = sum(len(s.response_ids) - sum(s.student_mask_or_ones()) for s in samples)
    out = {"rollout/turns_mean": sum(s.meta.get("turns", 1) for s in samples) / n,
           "rollout/turns_max": float(max(s.meta.get("turns", 1) for s in samples)),
           "rollout/tool_calls_mean": sum(s.meta.get("tool_calls", 0) for s in samples) / n,
           "rollout/obs_token_share": obs / max(total, 1)}
    for outcome in ("env_error", "env_timeout", "env_flood", "max_turns", "max_total_tokens"):
        out[f"rollout/{outcome}"] = sum(s.meta.get("outcome") == outcome for s in samples) / n
    return out


def length_metrics(samples: list[Sample]) -> dict[str, float]:
    """The distribution of response lengths (tokens after the prompt, observations included):
    rollout/response_length/{mean,max,min,p50,p90}."""
    if not samples:
        return {}
    lens = np.array([len(s.response_ids) for s in samples], dtype=np.float64)
    return {"rollout/response_length/mean": float(lens.mean()), "rollout/response_length/max": float(lens.max()),
            "rollout/response_length/min": float(lens.min()),
            "rollout/response_length/p50": float(np.percentile(lens, 50)),
            "rollout/response_length/p90": float(np.percentile(lens, 90))}
