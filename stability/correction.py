"""Train/inference mismatch correction weights.

The rollout engine samples with policy ``mu`` (vLLM kernels, maybe bf16, its own MoE routing); the
trainer recomputes ``pi_old`` for the same tokens. Even with identical weights the two differ, and for
MoE students the difference can be large (a routing flip changes the expert). Per token
``k = exp(log pi_old - log mu)`` measures it, and each mode turns ``k`` into a per-token weight ``w_t``
that multiplies that token's loss term:

* ``icepop`` (Ring-1T, arXiv 2510.18855): ``w = k`` inside ``[low, high]``, else 0 -- tokens whose
  engine and trainer disagree too much get no gradient at all;
* ``tis``: truncated importance sampling, ``w = min(k, cap)``;
* ``seq_mask``: geometric-mean rejection -- a sequence whose geometric mean of ``k`` over its valid
  tokens falls outside ``[low, high]`` is dropped (``w = 0`` on all its tokens), otherwise ``w = 1``
  (verl's ``seq_mean_k1`` rejection with the band inverted: see :func:`sequence_mask_weights`);
* ``none``: ``w = 1`` on valid tokens.

Weights are always detached (they change the measure, not the objective) and 0 at masked positions.
The log-ratio is clamped to ``[-20, 20]`` before ``exp`` (``exp(20)`` ~ 4.9e8), as verl does. A valid
token whose ``pi_old`` or ``mu`` log-prob is NaN/inf cannot be corrected: it gets weight 0 and is
counted in ``correction/nonfinite_frac``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LOG_RATIO_BOUND",
    "CORRECTION_MODES",
    "safe_log_ratio",
    "icepop_weights",
    "tis_weights",
    "sequence_mask_weights",
    "zero_weight_fraction",
    "correction_weights",
    "correction_metrics",
]

# exp(+-20) bounds every ratio to [2e-9, 4.9e8]: far beyond any band, and never overflows fp32.
LOG_RATIO_BOUND = 20.0
CORRECTION_MODES = ("none", "icepop", "tis", "seq_mask")


def safe_log_ratio(old_logprobs_BT: Tensor, rollout_logprobs_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """``log k = log pi_old - log mu``, clamped to ``[-20, 20]``, and the mask of tokens it is defined on.

    Why: every mode needs the same two things -- a finite log-ratio and the set of tokens where it is
    meaningful (valid and finite). Undefined entries hold 0 (``k = 1``) so that later arithmetic on
    them is harmless; callers must still zero them via the returned mask.

    Returns:
        ``(log_ratio_BT, ok_BT)``: float32 ``[B, T]`` detached; bool ``[B, T]`` = mask & finite.
    """
    if not (old_logprobs_BT.shape == rollout_logprobs_BT.shape == mask_BT.shape):
        raise ValueError(
            f"shape mismatch: old {tuple(old_logprobs_BT.shape)}, rollout {tuple(rollout_logprobs_BT.shape)}, "
            f"mask {tuple(mask_BT.shape)}")
    raw_BT = old_logprobs_BT.detach().float() - rollout_logprobs_BT.detach().float()
    ok_BT = mask_BT.bool() & torch.isfinite(raw_BT)
    log_ratio_BT = torch.where(ok_BT, raw_BT, torch.zeros_like(raw_BT)).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return log_ratio_BT, ok_BT


def icepop_weights(
    old_logprobs_BT: Tensor,
    rollout_logprobs_BT: Tensor,
    mask_BT: Tensor,
    low: float = 0.5,
    high: float = 5.0,
) -> Tensor:
    """IcePop: ``w = k`` if ``low <= k <= high`` else 0 (band inclusive, as verl's ``"low_high"`` spec).

    Why masking instead of clipping: a token the engine sampled with a very different probability is
    evidence of a kernel/routing mismatch, not of a better action; clipping would still push on it,
    masking removes it from the gradient entirely. The fraction removed is
    :func:`zero_weight_fraction` (``icepop/masked_frac`` in :func:`correction_weights`).

    Returns:
        float32 ``[B, T]``, detached, 0 at masked / non-finite / out-of-band tokens.
    """
    if not 0.0 < low <= high:
        raise ValueError(f"IcePop band needs 0 < low <= high, got low={low}, high={high}")
    log_ratio_BT, ok_BT = safe_log_ratio(old_logprobs_BT, rollout_logprobs_BT, mask_BT)
    k_BT = torch.exp(log_ratio_BT)
    keep_BT = ok_BT & (k_BT >= low) & (k_BT <= high)
    return torch.where(keep_BT, k_BT, torch.zeros_like(k_BT))


def tis_weights(
    old_logprobs_BT: Tensor,
    rollout_logprobs_BT: Tensor,
    mask_BT: Tensor,
    cap: float = 2.0,
) -> Tensor:
    """Truncated importance sampling: ``w = min(k, cap)``.

    Why truncate: the untruncated ratio is unbiased but its variance explodes on the rare tokens where
    ``mu`` is tiny; truncation trades a little bias for bounded variance.

    Returns:
        float32 ``[B, T]``, detached, 0 at masked / non-finite tokens.
    """
    if not cap > 0.0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    log_ratio_BT, ok_BT = safe_log_ratio(old_logprobs_BT, rollout_logprobs_BT, mask_BT)
    k_BT = torch.exp(log_ratio_BT).clamp(max=cap)
    return torch.where(ok_BT, k_BT, torch.zeros_like(k_BT))


def sequence_mask_weights(
    old_logprobs_BT: Tensor,
    rollout_logprobs_BT: Tensor,
    mask_BT: Tensor,
    low: float = 0.5,
    high: float = 5.0,
) -> Tensor:
    """Geometric-mean sequence rejection: drop a whole sequence whose ``exp(mean_t log k)`` is out of band.

    Design choice: kept sequences get weight **1**, not ``k`` nor the geometric mean. This mode is a
    rejection filter; combining a filter with a per-token reweighting is a separate choice, and a
    length-normalised geometric-mean weight is not an importance weight of anything. Why per sequence:
    a sequence whose tokens drift from the engine on average was likely generated under a different
    routing/numerics regime as a whole, even if no single token crosses a token-level band.

    Relation to verl: this is the decision of verl's ``rollout_rs="seq_mean_k1"`` with the band
    **inverted**, ``rollout_rs_threshold=f"{1/high}_{1/low}"``. verl's k1 statistic is
    ``log mu - log pi_old = -log k``, so its band bounds the geometric mean of ``1/k``: keeping
    ``exp(mean_t -log k)`` in ``[1/high, 1/low]`` is keeping ``exp(mean_t log k)`` in ``[low, high]``.
    With the same string ``f"{low}_{high}"`` the two agree only for a band symmetric in log space
    (``low * high == 1``). Both clamp each token's log-ratio to ``+-20`` first.

    The geometric mean is taken over the sequence's valid, finite tokens; a non-finite token gets
    weight 0 and is left out of the mean. A sequence with no such token gets 0 everywhere.

    Returns:
        float32 ``[B, T]`` of 0/1, detached.
    """
    if not 0.0 < low <= high:
        raise ValueError(f"sequence band needs 0 < low <= high, got low={low}, high={high}")
    log_ratio_BT, ok_BT = safe_log_ratio(old_logprobs_BT, rollout_logprobs_BT, mask_BT)
    n_B = ok_BT.sum(dim=-1)
    mean_log_B = (log_ratio_BT * ok_BT).sum(dim=-1) / n_B.clamp_min(1)
    geo_B = torch.exp(mean_log_B)
    keep_B = (n_B > 0) & (geo_B >= low) & (geo_B <= high)
    return (ok_BT & keep_B.unsqueeze(-1)).float()


def zero_weight_fraction(weights_BT: Tensor, mask_BT: Tensor) -> float:
    """Fraction of valid tokens whose weight is exactly 0 (i.e. that receive no gradient); 0.0 if none valid."""
    valid_BT = mask_BT.bool()
    n = int(valid_BT.sum().item())
    if n == 0:
        return 0.0
    return float(((weights_BT.detach() == 0) & valid_BT).sum().item()) / n


def correction_weights(
    mode: str,
    old_logprobs_BT: Tensor,
    rollout_logprobs_BT: Tensor | None,
    mask_BT: Tensor,
    *,
    low: float = 0.5,
    high: float = 5.0,
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Dispatch to one correction mode; return ``(weights_BT, metrics)``.

    ``low``/``high`` are the band of ``icepop`` (on ``k``) and of ``seq_mask`` (on the geometric mean of
    ``k``); ``cap`` is the TIS truncation. ``rollout_logprobs_BT`` may be None only for ``none``.

    Metrics (floats):
        ``icepop/masked_frac``: fraction of valid tokens given weight 0 (by the band, the sequence
        filter or a non-finite input; 0 for ``none``);
        ``correction/nonfinite_frac``: fraction of valid tokens with a NaN/inf log-prob (0 for ``none``,
        which does not read them);
        ``correction/weight_mean``: mean weight over valid tokens.
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown correction mode {mode!r}; allowed: {' | '.join(CORRECTION_MODES)}")
    if mode == "none":
        weights_BT = mask_BT.bool().float()
    else:
        if rollout_logprobs_BT is None:
            raise ValueError(f"correction mode {mode!r} needs the rollout engine's log-probs (mu)")
        if mode == "icepop":
            weights_BT = icepop_weights(old_logprobs_BT, rollout_logprobs_BT, mask_BT, low=low, high=high)
        elif mode == "tis":
            weights_BT = tis_weights(old_logprobs_BT, rollout_logprobs_BT, mask_BT, cap=cap)
        else:
            weights_BT = sequence_mask_weights(old_logprobs_BT, rollout_logprobs_BT, mask_BT, low=low, high=high)
    return weights_BT, correction_metrics(mode, weights_BT, old_logprobs_BT, rollout_logprobs_BT, mask_BT)


def correction_metrics(
    mode: str,
    weights_BT: Tensor,
    old_logprobs_BT: Tensor,
    rollout_logprobs_BT: Tensor | None,
    mask_BT: Tensor,
) -> dict[str, float]:
    """The metrics of :func:`correction_weights` from weights already formed (a trainer that forms them micro-batch
    by micro-batch reports the whole batch's once, from the weights it trained with)."""
    valid_BT = mask_BT.bool()
    n_valid = int(valid_BT.sum().item())
    nonfinite = 0
    if mode != "none" and rollout_logprobs_BT is not None:
        _, ok_BT = safe_log_ratio(old_logprobs_BT, rollout_logprobs_BT, mask_BT)
        nonfinite = n_valid - int(ok_BT.sum().item())
    denom = max(n_valid, 1)
    return {
        "icepop/masked_frac": zero_weight_fraction(weights_BT, mask_BT),
        "correction/nonfinite_frac": nonfinite / denom,
        "correction/weight_mean": float((weights_BT * valid_BT).sum().item()) / denom,
    }
