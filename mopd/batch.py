"""Scored samples -> padded tensors for the trainer.

Position convention: `*_BT` tensors are indexed by the *predicting* position t of `input_ids_BL`
(T = L - 1), so `logits[:, t]` scores token `input_ids[:, t + 1]`. `mask_BT` is 1 where that token is
part of the response *and written by the student*: a multi-turn trajectory's observation tokens (the
environment's, `Sample.student_mask` 0) are context only, so every consumer of the mask (losses, advantages,
teacher KL, IcePop/TIS weights, per-token metrics, token means) leaves them out by construction.
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

    def lengths(self) -> list[int]:
        """Tokens (prompt + response) of every row: what a micro-batch of it costs."""
        return [int(n) for n in self.attention_mask_BL.sum(dim=1)]

    def select(self, idx: list[int], trim: bool = False) -> TrainBatch:
        """Rows `idx`; `trim` also drops the right padding that none of them uses (rows are left-aligned, so a
        causal forward of the kept positions is unchanged), which is what a token budget counts."""
        pick = torch.tensor(idx, dtype=torch.long)
        if trim:
            L = max(self.attention_mask_BL[pick].sum(dim=1).max().item(), 2) if idx else self.input_ids_BL.shape[1]
            return _trimmed(self.select(idx), int(L))
        opt = lambda t: None if t is None else t[pick]  # noqa: E731
        return TrainBatch(self.input_ids_BL[pick], self.attention_mask_BL[pick], self.mask_BT[pick],
                          self.rollout_logprobs_BT[pick], self.teacher_logprobs_BT[pick], self.scores_B[pick],
                          self.group_B[pick], [self.domains[i] for i in idx], opt(self.teacher_topk_ids_BTK),
                          opt(self.teacher_topk_logprobs_BTK), opt(self.routed_experts_BLNK))


def _trimmed(b: TrainBatch, L: int) -> TrainBatch:
    T = L - 1
    opt = lambda t, n: None if t is None else t[:, :n]  # noqa: E731
    return TrainBatch(b.input_ids_BL[:, :L], b.attention_mask_BL[:, :L], b.mask_BT[:, :T],
                      b.rollout_logprobs_BT[:, :T], b.teacher_logprobs_BT[:, :T], b.scores_B, b.group_B, b.domains,
                      opt(b.teacher_topk_ids_BTK, T), opt(b.teacher_topk_logprobs_BTK, T),
                      opt(b.routed_experts_BLNK, L))


def split_rows(lengths_B: list[int], num_workers: int, rows_per_micro_batch: int,
               max_tokens: int = 0) -> list[list[list[int]]]:
    """Rows of a batch -> per worker, its micro-batches (lists of row indices).

    Rows go to workers by token count (longest first, each to the worker with the fewest tokens so far), so
    data-parallel workers finish their share at about the same time. Within a worker, `max_tokens` > 0 forms
    micro-batches by padded tokens (rows x longest row <= max_tokens; rows sorted by length so that similar
    lengths share a micro-batch and little is padding; a row longer than the budget gets one of its own), as
    verl's dynamic batch size does; otherwise consecutive `rows_per_micro_batch` rows. One worker without a
    token budget gets exactly the consecutive micro-batches of the single-process trainer. Every row is in
    exactly one micro-batch; a worker gets no row only when the batch has fewer rows than workers.
    """
    if num_workers < 1 or rows_per_micro_batch < 1 or max_tokens < 0:
        raise ValueError(f"split_rows needs num_workers >= 1, rows_per_micro_batch >= 1 and max_tokens >= 0, got "
                         f"{num_workers}, {rows_per_micro_batch}, {max_tokens}")
    rows: list[list[int]] = [[] for _ in range(num_workers)]
    load = [0] * num_workers
    for i in sorted(range(len(lengths_B)), key=lambda i: (-lengths_B[i], i)):
        w = min(range(num_workers), key=lambda w: (load[w], len(rows[w]), w))
        rows[w].append(i)
        load[w] += lengths_B[i]
    out = []
    for mine in rows:
        mine.sort()
        if max_tokens <= 0:
            out.append([mine[k:k + rows_per_micro_batch] for k in range(0, len(mine), rows_per_micro_batch)])
            continue
        micro: list[list[int]] = []
        for i in sorted(mine, key=lambda i: (-lengths_B[i], i)):
            if micro and (len(micro[-1]) + 1) * lengths_B[micro[-1][0]] <= max_tokens:
                micro[-1].append(i)  # sorted longest first: the micro-batch's first row sets its width
            else:
                micro.append([i])
        out.append([sorted(m) for m in micro])
    return out


def build_batch(samples: list[ScoredSample], pad_id: int) -> TrainBatch:
    B = len(samples)
    L = max(len(s.sample.prompt_ids) + len(s.sample.response_ids) for s in samples)
    T = L - 1
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, T))
    mu = torch.zeros((B, T))
    tlp = torch.zeros((B, T))
    has_topk = any(s.teacher_topk_ids is not None for s in samples)
    K = max((s.teacher_topk_ids.shape[1] for s in samples if s.teacher_topk_ids is not None), default=0)
    # Unused top-k slots: id -1 (the losses skip negative ids) and log-prob -inf.
    topk_ids = torch.full((B, T, K), -1, dtype=torch.long) if has_topk else None
    topk_lp = torch.full((B, T, K), -math.inf) if has_topk else None
    for b, s in enumerate(samples):
        p, r = s.sample.prompt_ids, s.sample.response_ids
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        attn[b, :n] = 1
        sl = slice(len(p) - 1, len(p) - 1 + len(r))
        if s.sample.student_mask is None:
            mask[b, sl] = 1.0
        else:
            mask[b, sl] = torch.tensor(s.sample.student_mask, dtype=torch.float32)
        mu[b, sl] = torch.tensor(s.sample.rollout_logprobs, dtype=torch.float32)
        if s.teacher_logprobs:
            tlp[b, sl] = torch.tensor(s.teacher_logprobs, dtype=torch.float32)
        if topk_ids is not None and topk_lp is not None and s.teacher_topk_ids is not None:
            ids_RK, lps_RK = s.teacher_topk_ids, s.teacher_topk_logprobs
            if lps_RK is None or ids_RK.shape != lps_RK.shape or ids_RK.ndim != 2 or len(ids_RK) > len(r):
                raise ValueError(f"row '{s.row['id']}': teacher top-k ids {getattr(ids_RK, 'shape', None)} / log-probs "
                                 f"{getattr(lps_RK, 'shape', None)} for {len(r)} response tokens")
            # Copied by numpy into the tensors' memory: arrays that came through Ray are read-only, and
            # torch.from_numpy warns about those even when it only reads them.
            rows = slice(len(p) - 1, len(p) - 1 + len(ids_RK))
            topk_ids.numpy()[b, rows, :ids_RK.shape[1]] = ids_RK
            topk_lp.numpy()[b, rows, :ids_RK.shape[1]] = lps_RK
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
