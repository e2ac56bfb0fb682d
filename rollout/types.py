"""What a rollout returns per sample; plain data so it crosses Ray and process boundaries cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    # The engine's log-prob of each sampled token (mu), pre-temperature.
    rollout_logprobs: list[float]
    finish_reason: str
    # R3: routed experts per token, int array [prompt+response tokens, layers, top_k]; None when off.
    routed_experts: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
