"""A teacher as a `vllm.LLM` that scores the student's own tokens by prefill (prompt log-probs), and the
Ray actors that hold one engine per replica.

Temperature is fixed at 1: the teacher's distribution, not a sharpened one, is the reward.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import AutoConfig

from rollout.actors import at, engine_actor
from rollout.scoring import TokenScores, prompt_logprobs_of
from rollout.types import EngineSpec
from rollout.vllm_engine import VllmEngine

# What a teacher returns per sequence: its log-prob of every response token, optionally its top-k.
TeacherScores = TokenScores


class ScoreBatch(list):
    """A scoring call's answer: its `TeacherScores` (a list, read as before) plus how the engine spent the call,
    which per-teacher accounting reads (`getattr`, so backends that return plain lists still work)."""

    score_s: float = 0.0  # the engine's seconds scoring this call
    swapped: bool = False  # a pooled engine loaded this teacher's weights just before (teachers/pool.py)
    swap_s: float = 0.0


class TeacherEngine(VllmEngine):
    """Scores sequences; can also generate (teacher samples for the off-policy SFT baseline)."""

    def __init__(self, model_path: str, *, max_top_k: int = 0, **kw) -> None:
        # Full-vocabulary scoring (top_k = -1) needs max_logprobs >= vocab.
        vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
        super().__init__(model_path, max_logprobs=vocab_size if max_top_k < 0 else max(1, max_top_k), **kw)

    def score(self, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> ScoreBatch:
        for i, s in enumerate(sequences):
            if len(s) + 1 > self.max_model_len:
                raise ValueError(f"sequence {i} has {len(s)} tokens, over the teacher's max_model_len="
                                 f"{self.max_model_len}; raise rollout.max_tokens/data.max_prompt_tokens consistently")
        if top_k > 0 and top_k > self.max_logprobs:
            raise ValueError(f"top_k={top_k} exceeds this teacher's max_logprobs={self.max_logprobs}")
        t0 = time.perf_counter()
        out = ScoreBatch(prompt_logprobs_of(self.llm, sequences, prompt_lens, top_k=top_k))
        out.score_s = time.perf_counter() - t0
        return out


def start_teacher(spec: EngineSpec, replicas: int, scheduling: list[Any] | None = None) -> list[Any]:
    """One engine actor per replica (not waited on)."""
    return [engine_actor(TeacherEngine, spec, at(scheduling, i)).remote(
        spec.model_path, max_top_k=spec.max_top_k, **spec.engine_kwargs()) for i in range(replicas)]


def start_vllm_teachers(launches: list[Any], replicas: int, scheduling: list[Any] | None = None) -> dict[str, list[Any]]:
    """The `vllm` backend's start function (teachers.backends): one engine actor per replica and teacher."""
    return {t.name: start_teacher(t.spec, replicas, scheduling) for t in launches}
