"""Train/inference mismatch diagnostics and the teacher-KL metric.

Names and definitions are verl's wherever verl computes the same quantity
(``verl/trainer/ppo/rollout_corr_helper.py``: ``compute_offpolicy_metrics``, ``compute_is_metrics`` and
``compute_rollout_correction_weights`` with ``rollout_is="token"``; ``verl/utils/debug/metrics.py``:
``calculate_debug_metrics``), so a dashboard reads the same for a mopd run and a verl run;
``tests/test_metric_names.py`` calls verl's functions and checks names and values. With
``k = pi_old / mu`` per valid token (``pi_old`` = the trainer's log-prob, ``mu`` = the engine's), and
per-sequence means taken over the sequence's valid tokens:

* ``rollout_corr/kl``              token mean of ``log mu - log pi_old`` (KL(mu || pi_old), k1 estimator)
* ``rollout_corr/k3_kl``           token mean of ``k - log k - 1`` (k3 estimator of the same KL; >= 0)
* ``rollout_corr/chi2_token``      token mean of ``k^2``, minus 1
* ``rollout_corr/chi2_seq``        sequence mean of ``exp(2 * clamp(sum_t log k, +-20))``, minus 1
* ``rollout_corr/training_ppl``    sequence mean of ``exp(-mean_t log pi_old)``
* ``rollout_corr/rollout_ppl``     sequence mean of ``exp(-mean_t log mu)``
* ``rollout_corr/log_ppl_diff``    sequence mean of ``d = mean_t log mu - mean_t log pi_old``
* ``rollout_corr/log_ppl_abs_diff`` sequence mean of ``|d|``
* ``rollout_corr/ppl_ratio``       sequence mean of ``exp(d)`` (= PPL_old / PPL_mu per sequence)
* ``rollout_corr/rollout_is_{mean,std,max,min}`` of the IS weights ``w`` over valid tokens (the applied
  weights if given, else ``k``; std is the population std, 0 with fewer than two tokens)
* ``rollout_corr/rollout_is_eff_sample_size`` normalised ESS ``mean(w)^2 / mean(w^2)`` in (0, 1]
* ``rollout_corr/rollout_is_oob_ratio`` (only when the IcePop band ``[low, high]`` is given) fraction of
  valid tokens whose ``k`` lies outside the band: the tokens IcePop masks
* ``training/rollout_probs_diff_{mean,max}`` of ``|pi_old - mu|`` over valid tokens (probabilities)

mopd's own addition, which verl does not compute (``EXTRA_METRIC_NAMES``):

* ``rollout_corr/extreme_token_frac@2`` fraction of valid tokens with ``max(k, 1/k) > 2`` (R3 paper,
  arXiv 2510.11370)

Differences from verl, all at edges verl does not handle: sequences with no valid token are left out
of sequence means (verl averages them in as perplexity 1 / ratio 1); tokens with a NaN/inf log-prob
are left out everywhere; with no valid token at all every metric is 0.0 (verl raises); with every
weight 0 the ESS is 0.0 (verl: inf); ``log k`` is clamped to ``+-20`` per token everywhere (verl
clamps only inside ``chi2_*`` and the IS weights). verl's ``rollout_is_*`` carry a ``+1e-8`` in their
denominators, a relative difference below 1e-8.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stability.correction import safe_log_ratio

__all__ = ["MISMATCH_METRIC_NAMES", "EXTRA_METRIC_NAMES", "mismatch_metrics", "teacher_kl", "teacher_kl_per_turn",
           "turn_index"]

#: Every key :func:`mismatch_metrics` can return (``rollout_is_oob_ratio`` only when a band is given).
MISMATCH_METRIC_NAMES = (
    "rollout_corr/kl",
    "rollout_corr/k3_kl",
    "rollout_corr/chi2_token",
    "rollout_corr/chi2_seq",
    "rollout_corr/training_ppl",
    "rollout_corr/rollout_ppl",
    "rollout_corr/log_ppl_diff",
    "rollout_corr/log_ppl_abs_diff",
    "rollout_corr/ppl_ratio",
    "rollout_corr/rollout_is_mean",
    "rollout_corr/rollout_is_std",
    "rollout_corr/rollout_is_max",
    "rollout_corr/rollout_is_min",
    "rollout_corr/rollout_is_eff_sample_size",
    "rollout_corr/rollout_is_oob_ratio",
    "training/rollout_probs_diff_mean",
    "training/rollout_probs_diff_max",
    "rollout_corr/extreme_token_frac@2",
)
#: The names above that verl does not compute (mopd's own diagnostics).
EXTRA_METRIC_NAMES = ("rollout_corr/extreme_token_frac@2",)

_OOB = "rollout_corr/rollout_is_oob_ratio"


def mismatch_metrics(
    old_logprobs_BT: Tensor,
    rollout_logprobs_BT: Tensor,
    mask_BT: Tensor,
    weights_BT: Tensor | None = None,
    *,
    low: float | None = None,
    high: float | None = None,
) -> dict[str, float]:
    """Scalar diagnostics of how far the trainer's ``pi_old`` is from the engine's ``mu`` on this batch.

    Why these: ``kl``/``k3_kl`` track the average gap, ``chi2_*`` and the ESS track the variance an
    importance-weighted gradient would have, ``rollout_is_oob_ratio`` and ``extreme_token_frac@2``
    count the tokens IcePop-like filters act on, and the perplexity terms show whether one side is
    systematically more confident.

    Args:
        old_logprobs_BT: trainer log-probs of the sampled tokens, ``[B, T]``.
        rollout_logprobs_BT: engine log-probs ``mu`` of the same tokens, ``[B, T]``.
        mask_BT: response-token mask, ``[B, T]``.
        weights_BT: the correction weights actually applied (e.g. from ``correction_weights``); when
            given, ``rollout_is_*`` describe them (verl's convention), otherwise the raw ratios ``k``.
        low, high: the IcePop band on ``k`` (both or neither); when given, ``rollout_is_oob_ratio`` is
            returned (whatever correction mode produced ``weights_BT``: it is a token-level diagnostic).

    Returns:
        dict of Python floats with exactly the keys of ``MISMATCH_METRIC_NAMES``, less
        ``rollout_corr/rollout_is_oob_ratio`` when no band is given.
    """
    if (low is None) != (high is None):
        raise ValueError(f"give both ends of the IcePop band or neither, got low={low}, high={high}")
    if low is not None and not 0.0 < low <= high:
        raise ValueError(f"IcePop band needs 0 < low <= high, got low={low}, high={high}")
    names = [n for n in MISMATCH_METRIC_NAMES if low is not None or n != _OOB]
    if weights_BT is not None and weights_BT.shape != mask_BT.shape:
        raise ValueError(f"weights_BT shape {tuple(weights_BT.shape)} != mask shape {tuple(mask_BT.shape)}")
    log_ratio_BT, ok_BT = safe_log_ratio(old_logprobs_BT, rollout_logprobs_BT, mask_BT)
    n = int(ok_BT.sum().item())
    if n == 0:
        return dict.fromkeys(names, 0.0)

    okf_BT = ok_BT.float()
    k_BT = torch.exp(log_ratio_BT)
    zeros_BT = torch.zeros_like(log_ratio_BT)

    def tok_mean(x_BT: Tensor) -> float:
        return float(torch.where(ok_BT, x_BT, zeros_BT).sum().item()) / n

    # Per-sequence statistics over sequences with at least one valid token.
    n_B = okf_BT.sum(dim=-1)
    seq_ok_B = n_B > 0
    old_BT = torch.where(ok_BT, old_logprobs_BT.detach().float(), zeros_BT)
    mu_BT = torch.where(ok_BT, rollout_logprobs_BT.detach().float(), zeros_BT)
    mean_old_B = old_BT.sum(dim=-1)[seq_ok_B] / n_B[seq_ok_B]
    mean_mu_B = mu_BT.sum(dim=-1)[seq_ok_B] / n_B[seq_ok_B]
    log_ppl_diff_B = mean_mu_B - mean_old_B
    sum_log_k_B = (log_ratio_BT * okf_BT).sum(dim=-1)[seq_ok_B].clamp(-20.0, 20.0)

    probs_diff = (old_BT.exp() - mu_BT.exp()).abs()[ok_BT]

    w = (k_BT if weights_BT is None else weights_BT.detach().float())[ok_BT]
    w_mean = w.mean().item()
    w_sq_mean = w.square().mean().item()
    w_std = w.std(correction=0).item() if n > 1 else 0.0

    out = {
        "rollout_corr/kl": tok_mean(-log_ratio_BT),
        "rollout_corr/k3_kl": tok_mean(k_BT - log_ratio_BT - 1.0),
        "rollout_corr/chi2_token": tok_mean(k_BT.square()) - 1.0,
        "rollout_corr/chi2_seq": torch.exp(2.0 * sum_log_k_B).mean().item() - 1.0,
        # float64: a sequence of near-impossible tokens must read as a huge perplexity, not inf
        "rollout_corr/training_ppl": torch.exp(-mean_old_B.double()).mean().item(),
        "rollout_corr/rollout_ppl": torch.exp(-mean_mu_B.double()).mean().item(),
        "rollout_corr/log_ppl_diff": log_ppl_diff_B.mean().item(),
        "rollout_corr/log_ppl_abs_diff": log_ppl_diff_B.abs().mean().item(),
        "rollout_corr/ppl_ratio": log_ppl_diff_B.exp().mean().item(),
        "rollout_corr/rollout_is_mean": w_mean,
        "rollout_corr/rollout_is_std": w_std,
        "rollout_corr/rollout_is_max": w.max().item(),
        "rollout_corr/rollout_is_min": w.min().item(),
        "rollout_corr/rollout_is_eff_sample_size": (w_mean * w_mean / w_sq_mean) if w_sq_mean > 0 else 0.0,
        "training/rollout_probs_diff_mean": probs_diff.mean().item(),
        "training/rollout_probs_diff_max": probs_diff.max().item(),
        "rollout_corr/extreme_token_frac@2": tok_mean((log_ratio_BT.abs() > math.log(2.0)).float()),
    }
    if low is not None:
        out[_OOB] = tok_mean(((k_BT < low) | (k_BT > high)).float())
    return {name: float(out[name]) for name in names}


def teacher_kl(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, mask_BT: Tensor) -> float:
    """Token mean of ``log pi_theta(y_t) - log pi_teacher(y_t)`` over response tokens (``mopd/teacher_kl``).

    Why this estimator: the tokens are the student's own samples, so this is the single-sample (k1)
    estimate of the reverse KL(pi_theta || pi_teacher) per token -- the quantity MOPD drives down, and
    the negative of the mean *unclipped* dense advantage (``mopd_advantage(..., clip=None)``; the
    metric is never clipped, so a teacher far off the student shows as such). Non-finite entries are
    left out; 0.0 with no valid token. Call it on a domain's rows for ``mopd/teacher_kl/<domain>``.
    This is the one implementation of the metric: callers holding ragged per-sample lists pad them
    into ``[B, T]`` tensors and a mask rather than averaging differences themselves.
    """
    if not (student_logprobs_BT.shape == teacher_logprobs_BT.shape == mask_BT.shape):
        raise ValueError(
            f"shape mismatch: student {tuple(student_logprobs_BT.shape)}, teacher "
            f"{tuple(teacher_logprobs_BT.shape)}, mask {tuple(mask_BT.shape)}")
    diff_BT = student_logprobs_BT.detach().float() - teacher_logprobs_BT.detach().float()
    ok_BT = mask_BT.bool() & torch.isfinite(diff_BT)
    n = int(ok_BT.sum().item())
    if n == 0:
        return 0.0
    return float(diff_BT[ok_BT].sum().item()) / n


def turn_index(mask_BT: Tensor) -> Tensor:
    """Which student turn each valid position belongs to (1, 2, ...; 0 where masked): in a multi-turn
    trajectory the student's turns are the runs of the mask between observation tokens (mask 0)."""
    valid_BT = mask_BT.bool()
    before_BT = torch.nn.functional.pad(valid_BT[:, :-1], (1, 0), value=False)
    return torch.cumsum((valid_BT & ~before_BT).long(), dim=1) * valid_BT.long()


def teacher_kl_per_turn(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, mask_BT: Tensor) -> dict[str, float]:
    """``mopd/teacher_kl_turn/<i>``: :func:`teacher_kl` over the student's i-th turn of every trajectory (where
    the student drifts from the teacher: after reading a tool's answer, or before). Empty when no row has a
    second turn, so single-turn runs log nothing new."""
    turn_BT = turn_index(mask_BT)
    last = int(turn_BT.max().item()) if turn_BT.numel() else 0
    if last < 2:
        return {}
    return {f"mopd/teacher_kl_turn/{i}": teacher_kl(student_logprobs_BT, teacher_logprobs_BT, (turn_BT == i).float())
            for i in range(1, last + 1)}
