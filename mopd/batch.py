"""Scored samples -> padded tensors for the trainer.

Position convention: `*_BT` tensors are indexed by the *predicting* position t of `input_ids_BL`
(T = L - 1), so `logits[:, t]` scores token `input_ids[:, t + 1]`. `mask_BT` is 1 where that token is
part of the response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mopd.samples import ScoredSample


@dataclass
class TrainBatch:
    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    mask_BT: torch.Tensor
    rollout_logprobs_BT: torch.Tensor
    teacher_logprobs_BT: torch.Tensor
    scores_B: torch.Tensor  # verifier scores (NaN where none)
    group_B: torch.Tensor
    domains: list[str]
    teacher_topk_ids_BTK: torch.Tensor | None = None
    teacher_topk_logprobs_BTK: torch.Tensor | None = None
    # R3: experts the engine routed each input position to, [B, L, moe layers, top_k]; -1 = no record.
    routed_experts_BLNK: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids_BL.shape[0]

    def select(self, idx: list[int]) -> TrainBatch:
        pick = torch.tensor(idx, dtype=torch.long)
        opt = lambda t: None if t is None else t[pick]  # noqa: E731
        return TrainBatch(self.input_ids_BL[pick], self.attention_mask_BL[pick], self.mask_BT[pick],
                          self.rollout_logprobs_BT[pick], self.teacher_logprobs_BT[pick], self.scores_B[pick],
                          self.group_B[pick], [self.domains[i] for i in idx], opt(self.teacher_topk_ids_BTK),
                          opt(self.teacher_topk_logprobs_BTK), opt(self.routed_experts_BLNK))


def build_batch(samples: list[ScoredSample], pad_id: int) -> TrainBatch:
    B = len(samples)
    L = max(len(s.sample.prompt_ids) + len(s.sample.response_ids) for s in samples)
    T = L - 1
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, T))
    mu = torch.zeros((B, T))
    tlp = torch.zeros((B, T))
    has_topk = any(s.teacher_topk_ids for s in samples)
    K = max((len(k) for s in samples for k in s.teacher_topk_ids), default=0)
    # Unused top-k slots: id -1 (the losses skip negative ids) and log-prob -inf.
    topk_ids = torch.full((B, T, K), -1, dtype=torch.long) if has_topk else None
    topk_lp = torch.full((B, T, K), -math.inf) if has_topk else None
    for b, s in enumerate(samples):
        p, r = s.sample.prompt_ids, s.sample.response_ids
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        attn[b, :n] = 1
        sl = slice(len(p) - 1, len(p) - 1 + len(r))
        mask[b, sl] = 1.0
        mu[b, sl] = torch.tensor(s.sample.rollout_logprobs, dtype=torch.float32)
        if s.teacher_logprobs:
            tlp[b, sl] = torch.tensor(s.teacher_logprobs, dtype=torch.float32)
        if has_topk:
            for j, (ki, kl) in enumerate(zip(s.teacher_topk_ids, s.teacher_topk_logprobs, strict=True)):
                topk_ids[b, len(p) - 1 + j, : len(ki)] = torch.tensor(ki)
                topk_lp[b, len(p) - 1 + j, : len(kl)] = torch.tensor(kl)
    routed = None
    recs = [s.sample.routed_experts for s in samples if s.sample.routed_experts is not None]
    if recs:
        _, N, K = recs[0].shape
        routed = torch.full((B, L, N, K), -1, dtype=torch.long)
        for b, s in enumerate(samples):
            rec = s.sample.routed_experts
            if rec is not None:
                n = min(len(rec), L)
                routed[b, :n] = torch.from_numpy(rec[:n].astype("int64"))
    scores = torch.tensor([math.nan if s.score is None else s.score for s in samples], dtype=torch.float32)
    groups = torch.tensor([s.group for s in samples], dtype=torch.long)
    return TrainBatch(ids, attn, mask, mu, tlp, scores, groups, [s.domain for s in samples], topk_ids, topk_lp,
                      routed)
