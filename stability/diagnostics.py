"""Train/inference mismatch diagnostics and the teacher-KL metric.

Definitions follow verl's ``rollout_corr_helper.compute_offpolicy_metrics`` / ``compute_is_metrics``
and ``utils/debug/metrics.py`` where verl has them, so dashboards read the same as verl's; the R3 paper
(arXiv 2510.11370) adds ``extreme_token_frac@2``. With ``k = pi_old / mu`` per valid token:

* ``rollout_corr/kl``         token mean of ``log mu - log pi_old`` (KL(mu || pi_old), k1 estimator)
* ``rollout_corr/k3_kl``      token mean of ``k - log k - 1`` (k3 estimator of the same KL; >= 0)
* ``rollout_corr/chi2_token`` token mean of ``k^2`` minus 1
* ``rollout_corr/log_ppl_diff`` sequence mean of (mean_t log mu - mean_t log pi_old)
* ``rollout_corr/ppl_ratio``  sequence mean of ``exp(log_ppl_diff_seq)`` (= PPL_old / PPL_mu per sequence)
* ``rollout_corr/probs_diff_{mean,max}`` of ``|pi_old - mu|`` over tokens (probabilities, not logs)
* ``rollout_corr/extreme_token_frac@2`` fraction of tokens with ``max(k, 1/k) > 2``
* ``is/mean``                 token mean of the IS weights (the applied ones if given, else ``k``)
* ``is/eff_sample_size``      normalised ESS ``mean(w)^2 / mean(w^2)`` in (0, 1] (0 if all w are 0)

Differences from verl, all at edges verl does not handle: sequences with no valid token are left out
of sequence means (verl averages their 0s in); tokens with a NaN/inf log-prob are left out; with no
valid token at all every metric is 0.0 (verl raises). ``k`` is clamped to ``exp(+-20)`` everywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stability.correction import safe_log_ratio

__all__ = ["MISMATCH_METRIC_NAMES", "mismatch_metrics", "teacher_kl"]

MISMATCH_METRIC_NAMES = (
    "rollout_corr/kl",
    "rollout_corr/k3_kl",
    "rollout_corr/chi2_token",
    "rollout_corr/log_ppl_diff",
    "rollout_corr/ppl_ratio",
    "rollout_corr/probs_diff_mean",
    "rollout_corr/probs_diff_max",
    "rollout_corr/extreme_token_frac@2",
    "is/mean",
    "is/eff_sample_size",
)


def mismatch_metrics(
    old_logprobs_BT: Tensor,
    rollout_logprobs_BT: Tensor,
    mask_BT: Tensor,
    weights_BT: Tensor | None = None,
) -> dict[str, float]:
    """Scalar diagnostics of how far the trainer's ``pi_old`` is from the engine's ``mu`` on this batch.

    Why these: ``kl``/``k3_kl`` track the average gap, ``chi2_token`` and the ESS track the variance an
    importance-weighted gradient would have, ``extreme_token_frac@2`` counts the tokens IcePop-like
    filters act on, and the perplexity terms show whether one side is systematically more confident.

    Args:
        old_logprobs_BT: trainer log-probs of the sampled tokens, ``[B, T]``.
        rollout_logprobs_BT: engine log-probs ``mu`` of the same tokens, ``[B, T]``.
        mask_BT: response-token mask, ``[B, T]``.
        weights_BT: the correction weights actually applied (e.g. from ``correction_weights``); when
            given, ``is/*`` describe them (verl's convention), otherwise the raw ratios ``k``.

    Returns:
        dict with exactly the keys of ``MISMATCH_METRIC_NAMES``, all Python floats.
    """
    log_ratio_BT, ok_BT = safe_log_ratio(old_logprobs_BT, rollout_logprobs_BT, mask_BT)
    n = int(ok_BT.sum().item())
    if n == 0:
        return dict.fromkeys(MISMATCH_METRIC_NAMES, 0.0)

    okf_BT = ok_BT.float()
    k_BT = torch.exp(log_ratio_BT)

    def tok_mean(x_BT: Tensor) -> float:
        return float((torch.where(ok_BT, x_BT, torch.zeros_like(x_BT))).sum().item()) / n

    # Per-sequence mean of log mu - log pi_old, over sequences with at least one valid token.
    n_B = okf_BT.sum(dim=-1)
    seq_ok_B = n_B > 0
    log_ppl_diff_B = -(log_ratio_BT * okf_BT).sum(dim=-1)[seq_ok_B] / n_B[seq_ok_B]

    old_BT = torch.where(ok_BT, old_logprobs_BT.detach().float(), torch.zeros_like(log_ratio_BT))
    mu_BT = torch.where(ok_BT, rollout_logprobs_BT.detach().float(), torch.zeros_like(log_ratio_BT))
    probs_diff = (old_BT.exp() - mu_BT.exp()).abs()[ok_BT]

    if weights_BT is None:
        w_BT = k_BT
    else:
        if weights_BT.shape != mask_BT.shape:
            raise ValueError(f"weights_BT shape {tuple(weights_BT.shape)} != mask shape {tuple(mask_BT.shape)}")
        w_BT = weights_BT.detach().float()
    w = w_BT[ok_BT]
    w_mean = w.mean().item()
    w_sq_mean = w.square().mean().item()
    ess = (w_mean * w_mean / w_sq_mean) if w_sq_mean > 0 else 0.0

    return {
        "rollout_corr/kl": tok_mean(-log_ratio_BT),
        "rollout_corr/k3_kl": tok_mean(k_BT - log_ratio_BT - 1.0),
        "rollout_corr/chi2_token": tok_mean(k_BT.square()) - 1.0,
        "rollout_corr/log_ppl_diff": log_ppl_diff_B.mean().item(),
        "rollout_corr/ppl_ratio": log_ppl_diff_B.exp().mean().item(),
        "rollout_corr/probs_diff_mean": probs_diff.mean().item(),
        "rollout_corr/probs_diff_max": probs_diff.max().item(),
        "rollout_corr/extreme_token_frac@2": tok_mean((log_ratio_BT.abs() > math.log(2.0)).float()),
        "is/mean": w_mean,
        "is/eff_sample_size": ess,
    }


def teacher_kl(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, mask_BT: Tensor) -> float:
    """Token mean of ``log pi_theta(y_t) - log pi_teacher(y_t)`` over response tokens (``mopd/teacher_kl``).

    Why this estimator: the tokens are the student's own samples, so this is the single-sample (k1)
    estimate of the reverse KL(pi_theta || pi_teacher) per token -- the quantity MOPD drives down, and
    the negative of the mean dense advantage. Non-finite entries are left out; 0.0 with no valid token.
    Call it on a domain's rows for ``mopd/teacher_kl/<domain>``.
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
