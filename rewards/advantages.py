"""Advantage assembly for MOPD (MiMo-V2-Flash, arXiv 2601.02780, Eq. 7-9).

Two signals are combined per response token:

* the dense teacher signal ``A_mopd[t] = sg(log pi_teacher(y_t) - log pi_theta(y_t))``: the per-token
  reverse-KL reward of on-policy distillation; positive where the teacher likes the student's token
  more than the student does; clamped to ``[-clip, clip]`` (default 10, as verl clamps its k1
  distillation term) so that a single token the teacher finds near-impossible cannot dominate a batch;
* an optional outcome signal ``A_orm``: a verifier score per sample, normalised within the group of
  samples drawn for the same prompt (GRPO), broadcast over that sample's tokens.

``A[t] = A_mopd[t] + alpha * A_orm``; ``alpha = 0`` is pure on-policy distillation.

Everything here is pure torch, carries no gradient (advantages are constants for the policy-gradient
loss), and is exactly 0 at padded / masked positions so that garbage there can never leak into a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_ADVANTAGE_CLIP",
    "mopd_advantage",
    "grpo_outcome_advantage",
    "combine_advantages",
    "advantage_metrics",
]

#: Default bound on the dense MOPD advantage ``|log pi_teacher - log pi_theta|`` (verl's ``loss_max_clamp``).
DEFAULT_ADVANTAGE_CLIP = 10.0


def mopd_advantage(
    teacher_logprobs_BT: Tensor,
    student_logprobs_BT: Tensor,
    mask_BT: Tensor,
    clip: float | None = DEFAULT_ADVANTAGE_CLIP,
) -> Tensor:
    """Dense MOPD advantage ``sg(clamp(log pi_teacher(y_t) - log pi_theta(y_t), -clip, clip))`` per token.

    Why detached: the advantage is a reward, not part of the objective's graph; letting gradient flow
    through ``-log pi_theta`` here would add an entropy-like term nobody asked for.

    Why clipped (``clip``, config ``algorithm.advantage_clip``, default 10; ``None`` disables): one token
    the teacher gives probability ~0 (log-prob -30, say) would otherwise carry an advantage dozens of
    times larger than every other token's and dominate the whole batch's gradient. verl bounds the same
    k1 term the same way: ``DistillationLossConfig.loss_max_clamp`` (dataclass default 10.0; null in its
    YAML) clamps it to ``[-10, 10]``. The metric ``mopd/teacher_kl`` (``stability.diagnostics.teacher_kl``)
    is never clipped.

    Non-finite inputs at valid positions (e.g. a teacher position the engine returned as ``None`` and
    the caller stored as NaN) give advantage 0 there: no signal is better than a NaN that poisons the
    whole batch. Masked positions are always exactly 0, whatever they hold.

    Args:
        teacher_logprobs_BT: teacher log-prob of each sampled student token, ``[B, T]``.
        student_logprobs_BT: student (trainer) log-prob of the same tokens, ``[B, T]``.
        mask_BT: 1/True at response tokens, 0/False at prompt/padding, ``[B, T]``.
        clip: bound on ``|log pi_teacher - log pi_theta|`` (> 0), or None for no bound.

    Returns:
        ``[B, T]`` float tensor, detached.
    """
    _check_same_shape(teacher_logprobs_BT=teacher_logprobs_BT, student_logprobs_BT=student_logprobs_BT,
                      mask_BT=mask_BT)
    if clip is not None and not clip > 0:
        raise ValueError(f"advantage clip must be > 0 or None (no clipping), got {clip}")
    diff_BT = teacher_logprobs_BT.detach().float() - student_logprobs_BT.detach().float()
    keep_BT = mask_BT.bool() & torch.isfinite(diff_BT)
    if clip is not None:
        diff_BT = diff_BT.clamp(-clip, clip)
    return torch.where(keep_BT, diff_BT, torch.zeros_like(diff_BT))


def grpo_outcome_advantage(
    scores_B: Tensor,
    group_index_B: Tensor | Sequence[Any],
    eps: float = 1e-6,
    normalize_std: bool = True,
) -> Tensor:
    """Group-normalised outcome advantage (GRPO): ``(r - mean_group) / (std_group + eps)``.

    Why group-normalised: the ``n`` samples of one prompt share its difficulty, so the group mean is a
    free baseline and the std puts easy and hard prompts on one scale. ``normalize_std=False`` gives the
    Dr. GRPO variant ``r - mean_group`` (no length/difficulty re-weighting by the std).

    Conventions (chosen, and tested):

    * the std is the unbiased (Bessel-corrected) sample std, as in verl's
      ``compute_grpo_outcome_advantage`` and TRL, so values agree with those on groups of size >= 2;
    * a group of size 1 gets advantage 0 (verl instead passes the raw score through): a lone sample
      has no baseline, and a raw score as advantage would dwarf every normalised one;
    * a group whose scores are all equal gets exactly 0 (not ``rounding_error / eps``);
    * non-finite scores (a verifier that failed) are left out of their group's statistics and get 0.

    Args:
        scores_B: one scalar score per sample, ``[B]``.
        group_index_B: group id per sample, ``[B]``: an integer tensor or any sequence of hashables
            (e.g. prompt uids as strings).
        eps: added to the std before dividing.
        normalize_std: divide by the group std (GRPO) or not (Dr. GRPO).

    Returns:
        ``[B]`` float tensor, detached.
    """
    scores_B = scores_B.detach()
    if scores_B.dim() != 1:
        raise ValueError(f"scores_B must be 1-D [B], got shape {tuple(scores_B.shape)}")
    gid_B = _group_ids(group_index_B, scores_B.device)
    if gid_B.shape != scores_B.shape:
        raise ValueError(f"group_index_B has {gid_B.numel()} entries, scores_B has {scores_B.numel()}")
    if scores_B.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=scores_B.device)

    # float64 for the group moments: scores are few, and exact ties must stay exact.
    r_B = scores_B.to(torch.float64)
    valid_B = torch.isfinite(r_B)
    r0_B = torch.where(valid_B, r_B, torch.zeros_like(r_B))
    n_groups = int(gid_B.max().item()) + 1
    count_G = torch.zeros(n_groups, dtype=torch.float64, device=r_B.device).index_add_(0, gid_B, valid_B.double())
    sum_G = torch.zeros_like(count_G).index_add_(0, gid_B, r0_B)
    mean_G = sum_G / count_G.clamp_min(1.0)
    centred_B = torch.where(valid_B, r_B - mean_G[gid_B], torch.zeros_like(r_B))
    sq_G = torch.zeros_like(count_G).index_add_(0, gid_B, centred_B.square())
    std_G = (sq_G / (count_G - 1.0).clamp_min(1.0)).sqrt()

    # Exact-tie groups: max == min over the group's valid scores.
    big = torch.finfo(torch.float64).max
    max_G = torch.full_like(count_G, -big).scatter_reduce(
        0, gid_B, torch.where(valid_B, r_B, torch.full_like(r_B, -big)), reduce="amax")
    min_G = torch.full_like(count_G, big).scatter_reduce(
        0, gid_B, torch.where(valid_B, r_B, torch.full_like(r_B, big)), reduce="amin")
    informative_G = (count_G >= 2) & (max_G > min_G)

    adv_B = centred_B / (std_G[gid_B] + eps) if normalize_std else centred_B
    keep_B = valid_B & informative_G[gid_B]
    return torch.where(keep_B, adv_B, torch.zeros_like(adv_B)).to(torch.float32)


ADVANTAGE_NORMS = ("none", "center", "whiten")


def normalize_advantage(adv_BT: Tensor, mask_BT: Tensor, mode: str = "none", eps: float = 1e-6) -> Tensor:
    """The batch's dense advantage centred (``center``: minus its mean over valid tokens) or whitened
    (``whiten``: also divided by their std), as PPO whitens GAE advantages; ``none`` returns it unchanged.

    Why: the k1 MOPD advantage ``log pi_T - log pi_theta`` has mean ``-KL(pi_theta || pi_T) < 0`` under the
    student's own samples, so without a baseline nearly every sampled token is pushed down; the freed mass
    goes to tokens nobody sampled, entropy climbs and the teacher KL with it (measured on the quickstart: entropy
    0.9 -> 1.8 nats, teacher KL 2.5 -> 4.6, accuracy to ~0 in 100 steps at lr 1e-3). A constant baseline
    leaves the expected gradient unchanged (``E[grad log pi] = 0``) and removes that drift.

    Args:
        adv_BT: ``[B, T]`` advantages, 0 at masked positions.
        mask_BT: 1/True at valid tokens.
        mode: ``none`` | ``center`` | ``whiten``.

    Returns:
        ``[B, T]``, exactly 0 at masked positions.
    """
    if mode not in ADVANTAGE_NORMS:
        raise ValueError(f"advantage norm must be one of {ADVANTAGE_NORMS}, got {mode!r}")
    _check_same_shape(adv_BT=adv_BT, mask_BT=mask_BT)
    m = mask_BT.bool()
    if mode == "none" or not m.any():
        return adv_BT
    vals = adv_BT[m]
    out = adv_BT - vals.mean()
    if mode == "whiten":
        out = out / (vals.std(unbiased=False) + eps)
    return torch.where(m, out, torch.zeros_like(out))


def combine_advantages(
    a_mopd_BT: Tensor,
    a_orm_B: Tensor | None,
    alpha: float,
    mask_BT: Tensor,
) -> Tensor:
    """``A[t] = A_mopd[t] + alpha * A_orm`` with the per-sample outcome term broadcast over its tokens.

    Why broadcast: the verifier scores the whole sample, so every token of it shares the credit (as in
    GRPO). ``a_orm_B`` may be None when ``alpha == 0`` (pure OPD). Masked positions are exactly 0.

    Returns:
        ``[B, T]`` float tensor, detached.
    """
    _check_same_shape(a_mopd_BT=a_mopd_BT, mask_BT=mask_BT)
    a_BT = a_mopd_BT.detach().float()
    if alpha != 0.0:
        if a_orm_B is None:
            raise ValueError(f"alpha={alpha} needs a_orm_B (one outcome advantage per sample)")
        if a_orm_B.shape != a_BT.shape[:1]:
            raise ValueError(f"a_orm_B must be [B]={tuple(a_BT.shape[:1])}, got {tuple(a_orm_B.shape)}")
        a_BT = a_BT + alpha * a_orm_B.detach().float().unsqueeze(-1)
    return torch.where(mask_BT.bool(), a_BT, torch.zeros_like(a_BT))


def advantage_metrics(advantages_BT: Tensor, mask_BT: Tensor, prefix: str = "mopd/advantage") -> dict[str, float]:
    """``{prefix}/{mean,min,max}`` over valid tokens (all 0.0 when there is none), for the step record."""
    valid = advantages_BT.detach()[mask_BT.bool()].float()
    if valid.numel() == 0:
        return {f"{prefix}/mean": 0.0, f"{prefix}/min": 0.0, f"{prefix}/max": 0.0}
    return {f"{prefix}/mean": valid.mean().item(), f"{prefix}/min": valid.min().item(),
            f"{prefix}/max": valid.max().item()}


def _group_ids(group_index_B: Tensor | Sequence[Any], device: torch.device) -> Tensor:
    """Map arbitrary group labels to dense int64 ids ``0..G-1`` (first-seen order is irrelevant)."""
    if isinstance(group_index_B, Tensor):
        _, inverse = torch.unique(group_index_B.to(device), return_inverse=True)
        return inverse.reshape(-1).long()
    table: dict[Any, int] = {}
    ids = [table.setdefault(g.item() if hasattr(g, "item") else g, len(table)) for g in group_index_B]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")
