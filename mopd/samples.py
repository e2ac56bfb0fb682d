"""A student (or teacher) sample on its way to the trainer, and what the loop reports about a batch of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rollout.types import Sample
from stability.diagnostics import teacher_kl


@dataclass
class ScoredSample:
    row: dict
    group: int  # index of its prompt in the batch (GRPO groups)
    sample: Sample
    teacher: str = ""
    teacher_logprobs: list[float] = field(default_factory=list)
    # The teacher's top-k per response token, [response tokens, K] (rollout.scoring.TokenScores); None: none.
    teacher_topk_ids: np.ndarray | None = None
    teacher_topk_logprobs: np.ndarray | None = None
    text: str = ""
    score: float | None = None

    @property
    def domain(self) -> str:
        return self.row["domain"]


def domain_summary(samples: list[ScoredSample]) -> dict[str, dict[str, float]]:
    """Per domain: verifier accuracy and mean teacher KL (log mu - log pi_teacher over response tokens, the
same estimator as `mopd/teacher_kl`, on the engine's log-probs)."""
    out: dict[str, dict[str, float]] = {}
    for d in sorted({s.domain for s in samples}):
        ss = [s for s in samples if s.domain == d]
        scored = [s.score for s in ss if s.score is not None]
        out[d] = {
            "acc": float(np.mean(scored)) if scored else float("nan"),
            "teacher_kl": _teacher_kl([s for s in ss if s.teacher_logprobs]),
            "samples": float(len(ss)),
            "response_length": float(np.mean([len(s.sample.response_ids) for s in ss])),
        }
    return out


def _teacher_kl(samples: list[ScoredSample]) -> float:
    """`stability.diagnostics.teacher_kl` of the engine's log-probs (mu) against the teacher's; NaN when no
    sample was scored by a teacher."""
    if not samples:
        return float("nan")
    T = max(len(s.sample.rollout_logprobs) for s in samples)
    mu_BT, teacher_BT, mask_BT = torch.zeros(len(samples), T), torch.zeros(len(samples), T), torch.zeros(len(samples), T)
    for b, s in enumerate(samples):
        n = len(s.sample.rollout_logprobs)
        if len(s.teacher_logprobs) != n:
            raise ValueError(f"row '{s.row['id']}': {len(s.teacher_logprobs)} teacher log-probs for {n} response tokens")
        mu_BT[b, :n] = torch.tensor(s.sample.rollout_logprobs)
        teacher_BT[b, :n] = torch.tensor(s.teacher_logprobs)
        mask_BT[b, :n] = torch.tensor(s.sample.student_mask_or_ones(), dtype=torch.float32)
    return teacher_kl(mu_BT, teacher_BT, mask_BT)
