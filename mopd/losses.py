"""MOPD training objectives, pure torch: the policy-gradient loss and the top-k reverse-KL loss.

Both aggregate per-token losses with :func:`agg_loss`. The default is "token-mean per sequence, then mean
over sequences" (verl's ``seq-mean-token-mean``): each sequence weighs the same whatever its length, so
long samples do not dominate the gradient. ``token-mean`` (verl's) and ``domain-balanced`` (each domain
weighs the same) are the alternatives (:data:`AGG_MODES`, ``algorithm.loss_agg_mode``). ``|y|`` is the
number of *valid* (mask) tokens of the sequence; a token whose correction weight ``w_t`` is 0 (e.g. masked
by IcePop) still counts in ``|y|`` -- it just contributes nothing. Sequences with no valid token are left
out of the mean over sequences; a batch with none at all gives loss 0 whose gradient is defined (zeros),
never NaN.

Whatever masked positions hold (padding garbage, NaN) never reaches the loss or its gradient: inputs
are replaced by constants there with ``torch.where`` *before* any arithmetic, since ``0 * NaN`` in a
backward pass would otherwise still poison the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "AggNorm",
    "TOPK_MODES",
    "agg_loss",
    "agg_norm",
    "seq_mean_token_mean",
    "pg_loss",
    "reverse_kl_per_token",
    "reverse_kl_loss",
    "reverse_kl_loss_from_terms",
    "ReverseKLTerms",
    "sanitize_teacher_topk",
    "token_entropy",
]

# ratio = exp(clamp(logp - old, -20, 20)) in the PPO branch, as verl does.
_LOG_RATIO_BOUND = 20.0
# Floor for teacher log-probs and the teacher's tail mass (log 1e-30): keeps -inf (probability 0)
# finite so that "student mass where the teacher has none" gives a large but finite penalty.
_TEACHER_LOGP_FLOOR = math.log(1e-30)
TOPK_MODES = ("tail", "renorm")
# `algorithm.loss_agg_mode`; the first two are verl's `agg_loss` modes of the same name and meaning.
AGG_MODES = ("seq-mean-token-mean", "token-mean", "domain-balanced")
AggMode = Literal["seq-mean-token-mean", "token-mean", "domain-balanced"]


def seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean over sequences (with >= 1 valid token) of the per-sequence mean over valid tokens.

    Why: every sample gets the same say regardless of length. Equal to verl's ``agg_loss(...,
    "seq-mean-token-mean")`` whenever a sequence has a valid token; an all-masked batch gives a 0
    that is still attached to ``loss_BT``'s graph (gradient zeros).
    """
    if loss_BT.shape != mask_BT.shape:
        raise ValueError(f"loss {tuple(loss_BT.shape)} and mask {tuple(mask_BT.shape)} differ in shape")
    valid_BT = mask_BT.bool()
    loss0_BT = torch.where(valid_BT, loss_BT, torch.zeros_like(loss_BT))
    n_B = valid_BT.sum(dim=-1)
    seq_B = loss0_BT.sum(dim=-1) / n_B.clamp_min(1)
    has_B = n_B > 0
    return torch.where(has_B, seq_B, torch.zeros_like(seq_B)).sum() / has_B.sum().clamp_min(1)


@dataclass(frozen=True)
class AggNorm:
    """Whole-batch normalisers of :func:`agg_loss`, computed once per batch by :func:`agg_norm`.

    Why: a trainer that accumulates gradients over micro-batches weights each micro-batch's loss by its
    share of the rows, ``b / B``. That reproduces the whole-batch loss only when the micro-batch mean uses
    the whole batch's denominators: for ``token-mean`` the valid-token count, for ``seq-mean-token-mean``
    the count of non-empty sequences, for ``domain-balanced`` the per-domain counts and the number of
    domains. Given these, ``sum_mb (b / B) * agg_loss(mb, norm=agg_norm(whole))`` equals
    ``agg_loss(whole)`` for every mode and any split into micro-batches.
    """

    rows: int  # B: rows of the whole batch
    num_tokens: int  # valid tokens in the whole batch
    num_seqs: int  # sequences with >= 1 valid token
    group_seqs_G: Tensor | None  # per group id, its sequences with >= 1 valid token (None: no group ids)


def agg_norm(mask_BT: Tensor, group_B: Tensor | None = None) -> AggNorm:
    """The normalisers of the whole batch (``mask_BT`` and ``group_B`` of *all* its rows)."""
    valid_BT = mask_BT.bool()
    has_B = valid_BT.any(dim=-1)
    group_seqs_G = None
    if group_B is not None:
        g_B = _check_groups(group_B, mask_BT.shape[0])
        size = int(g_B.max().item()) + 1 if g_B.numel() else 0
        group_seqs_G = torch.bincount(g_B[has_B.to(g_B.device)], minlength=size).detach().cpu()
    return AggNorm(rows=mask_BT.shape[0], num_tokens=int(valid_BT.sum().item()),
                   num_seqs=int(has_B.sum().item()), group_seqs_G=group_seqs_G)


def _check_groups(group_B: Tensor, B: int) -> Tensor:
    if group_B.shape != (B,):
        raise ValueError(f"group ids {tuple(group_B.shape)} must be one per row, [B] = [{B}]")
    if group_B.dtype.is_floating_point or group_B.dtype == torch.bool:
        raise ValueError(f"group ids must be integers (domain index per row), got {group_B.dtype}")
    g_B = group_B.long()
    if g_B.numel() and bool((g_B < 0).any()):
        raise ValueError("group ids must be >= 0")
    return g_B


def agg_loss(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: AggMode | str = "seq-mean-token-mean",
    group_B: Tensor | None = None,
    *,
    norm: AggNorm | None = None,
) -> Tensor:
    """Aggregate per-token losses ``[B, T]`` to a scalar; ``mode`` is one of :data:`AGG_MODES`.

    * ``"seq-mean-token-mean"`` (default): per sequence the mean over its valid tokens, then the mean
      over the sequences that have one. Each sample weighs the same whatever its length.
    * ``"token-mean"``: sum over all valid tokens / number of valid tokens. Each token weighs the same, so
      long samples weigh more.
    * ``"domain-balanced"``: per domain (``group_B``: int domain index per row) the seq-mean-token-mean of
      its sequences, then the mean over the domains present (with >= 1 valid token). Each *domain* weighs
      the same whatever its count and lengths of samples. Why: multi-teacher OPD under-serves domains with
      few or short samples (Open-MOPD, arXiv 2608.19098); under a seq or token mean a domain's say in the
      step is its share of the batch.

    The first two equal verl's ``agg_loss`` modes of the same name (verl's seq mean also divides by
    ``|y| + 1e-8``, a relative difference of ~1e-8). Masked positions never reach the value or the
    gradient (NaN there is harmless); with no valid token at all the result is a 0 still attached to
    ``loss_BT``'s graph (gradient zeros, never NaN).

    ``norm``: the whole batch's :class:`AggNorm` when this call sees one micro-batch of ``b`` rows of it.
    The value returned is then the micro-batch's share of the whole-batch loss times ``B / b``, so that a
    row-weighted accumulation (``sum (b / B) * loss_mb``) equals the whole-batch loss exactly. ``group_B``
    must then hold the same ids the norm was computed with. None: this batch is the whole batch.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; allowed: {' | '.join(AGG_MODES)}")
    if loss_BT.shape != mask_BT.shape or loss_BT.dim() != 2:
        raise ValueError(f"loss {tuple(loss_BT.shape)} and mask {tuple(mask_BT.shape)} must both be [B, T]")
    B = loss_BT.shape[0]
    if mode == "domain-balanced":
        if group_B is None:
            raise ValueError("loss_agg_mode='domain-balanced' needs group_B (the domain index of every row)")
        group_B = _check_groups(group_B, B)
    if norm is None:
        norm = agg_norm(mask_BT, group_B if mode == "domain-balanced" else None)
    valid_BT = mask_BT.bool()
    loss0_BT = torch.where(valid_BT, loss_BT, torch.zeros_like(loss_BT))
    scale = norm.rows / B if B else 1.0
    if mode == "token-mean":
        return loss0_BT.sum() / max(norm.num_tokens, 1) * scale
    n_B = valid_BT.sum(dim=-1)
    seq_B = loss0_BT.sum(dim=-1) / n_B.clamp_min(1)
    has_B = n_B > 0
    seq_B = torch.where(has_B, seq_B, torch.zeros_like(seq_B))
    if mode == "seq-mean-token-mean":
        return seq_B.sum() / max(norm.num_seqs, 1) * scale
    assert group_B is not None
    if norm.group_seqs_G is None:
        raise ValueError("loss_agg_mode='domain-balanced' needs a norm computed with group ids: "
                         "agg_norm(mask, group_B)")
    counts_G = norm.group_seqs_G.to(seq_B.device)
    if bool((group_B >= counts_G.numel()).any()):
        raise ValueError(f"group id {int(group_B.max())} is not in the norm's {counts_G.numel()} groups")
    n_domains = max(int((counts_G > 0).sum().item()), 1)
    # 1 / (domains present x sequences of the row's domain); a row without valid tokens has seq 0.
    denom_B = (counts_G[group_B.to(seq_B.device)].clamp_min(1) * n_domains).to(seq_B.dtype)
    return (seq_B / denom_B).sum() * scale


def pg_loss(
    logprobs_BT: Tensor,
    advantages_BT: Tensor,
    weights_BT: Tensor | None,
    mask_BT: Tensor,
    old_logprobs_BT: Tensor | None = None,
    clip_eps: float | None = None,
    *,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
    agg_mode: AggMode | str = "seq-mean-token-mean",
    group_B: Tensor | None = None,
    norm: AggNorm | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Policy-gradient loss: REINFORCE form of MiMo-V2-Flash Eq. 7, or PPO's clipped surrogate.

    REINFORCE (default): ``L = -mean_seq( (1/|y|) * sum_t w_t * A_t * log pi_theta(y_t) )``. Its gradient
    is ``-mean_seq((1/|y|) sum_t w_t A_t grad log pi_theta(y_t))``: a gradient *descent* step raises the
    log-prob of tokens with positive advantage. This is the right form for one optimizer step per batch.

    PPO (``clip_eps`` and ``old_logprobs_BT`` given; for several steps per batch): per token
    ``max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high))`` with ``r = exp(log pi_theta - log pi_old)``,
    optionally dual-clipped at ``-A * dual_clip_c`` for ``A < 0`` (Ye et al. 2019), then times ``w_t``
    (after clipping, as verl does) and aggregated the same way. At ``r = 1`` its gradient equals the
    REINFORCE gradient.

    Aggregation: :func:`agg_loss` with ``agg_mode`` (default ``seq-mean-token-mean``, the ``mean_seq`` and
    ``1/|y|`` above), ``group_B`` (domain ids, for ``domain-balanced``) and ``norm`` (whole-batch
    normalisers when this is one micro-batch).

    Args:
        logprobs_BT: current log-prob of each sampled token, ``[B, T]``; carries the gradient.
        advantages_BT: ``A_t``, ``[B, T]``; detached here.
        weights_BT: correction weights ``w_t`` (IcePop/TIS/...), ``[B, T]``, or None for all ones;
            detached here.
        mask_BT: response-token mask, ``[B, T]``.
        old_logprobs_BT: ``log pi_old`` for the PPO ratio, ``[B, T]``.
        clip_eps: PPO clip range (lower side, and upper side unless ``clip_eps_high`` is set).
        clip_eps_high: upper clip range ("clip-higher", DAPO); defaults to ``clip_eps``.
        dual_clip_c: dual-clip constant (> 1) for negative advantages; None disables it.
        agg_mode, group_B, norm: passed to :func:`agg_loss`.

    Returns:
        ``(loss, metrics)``: scalar loss; metrics ``actor/pg_loss`` and, for PPO, ``actor/pg_clipfrac``
        (fraction of valid tokens where the clipped term is active) and ``actor/ppo_kl`` (token mean of
        ``log pi_old - log pi_theta``).
    """
    use_ppo = clip_eps is not None
    if use_ppo and old_logprobs_BT is None:
        raise ValueError("PPO clipping (clip_eps set) needs old_logprobs_BT")
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    shapes = {tuple(t.shape) for t in (logprobs_BT, advantages_BT, mask_BT) if t is not None}
    shapes |= {tuple(t.shape) for t in (weights_BT, old_logprobs_BT) if t is not None}
    if len(shapes) != 1:
        raise ValueError(f"pg_loss inputs differ in shape: {sorted(shapes)}")

    valid_BT = mask_BT.bool()
    # bf16 log-probs are upcast: a token mean of bf16 products loses most of its digits.
    logprobs_BT = logprobs_BT.to(torch.promote_types(logprobs_BT.dtype, torch.float32))
    zeros_BT = torch.zeros_like(logprobs_BT)
    logp_BT = torch.where(valid_BT, logprobs_BT, zeros_BT)
    adv_BT = torch.where(valid_BT, advantages_BT.detach().to(logp_BT.dtype), zeros_BT.detach())
    w_BT = valid_BT.to(logp_BT.dtype) if weights_BT is None else torch.where(
        valid_BT, weights_BT.detach().to(logp_BT.dtype), zeros_BT.detach())

    metrics: dict[str, float] = {}
    if not use_ppo:
        per_token_BT = -w_BT * adv_BT * logp_BT
    else:
        assert old_logprobs_BT is not None
        old_BT = torch.where(valid_BT, old_logprobs_BT.detach().to(logp_BT.dtype), zeros_BT.detach())
        log_ratio_BT = (logp_BT - old_BT).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        ratio_BT = torch.exp(log_ratio_BT)
        hi = clip_eps if clip_eps_high is None else clip_eps_high
        surr1_BT = -adv_BT * ratio_BT
        surr2_BT = -adv_BT * ratio_BT.clamp(1.0 - clip_eps, 1.0 + hi)
        per_token_BT = torch.maximum(surr1_BT, surr2_BT)
        if dual_clip_c is not None:
            per_token_BT = torch.where(adv_BT < 0, torch.minimum(per_token_BT, -adv_BT * dual_clip_c), per_token_BT)
        per_token_BT = per_token_BT * w_BT
        n = max(int(valid_BT.sum().item()), 1)
        metrics["actor/pg_clipfrac"] = float(((surr2_BT > surr1_BT) & valid_BT).sum().item()) / n
        metrics["actor/ppo_kl"] = float((-log_ratio_BT.detach() * valid_BT).sum().item()) / n

    loss = agg_loss(per_token_BT, mask_BT, agg_mode, group_B, norm=norm)
    metrics["actor/pg_loss"] = loss.item()
    return loss, metrics


def _kl_terms(logp_X: Tensor, logq_X: Tensor) -> Tensor:
    """Elementwise ``p (log p - log q)`` with the ``0 log 0 = 0`` convention, NaN-free in value and grad.

    ``log p`` may be ``-inf`` (probability 0); ``log q`` must be finite. The zero branch is computed
    from a sanitised copy so that the unused branch of ``where`` cannot produce a NaN gradient.
    """
    pos_X = torch.isfinite(logp_X)
    safe_X = torch.where(pos_X, logp_X, torch.zeros_like(logp_X))
    return torch.where(pos_X, safe_X.exp() * (safe_X - logq_X), torch.zeros_like(safe_X))


def reverse_kl_per_token(
    student_logprobs_BTV: Tensor,
    teacher_topk_ids_BTK: Tensor,
    teacher_topk_logprobs_BTK: Tensor,
    topk_mode: Literal["tail", "renorm"] = "tail",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position reverse KL(p_theta || p_teacher) over the teacher's top-k support.

    Top-k handling (the teacher gives log-probs only for its top-k tokens ``S``):

    * ``"tail"`` (default): the vocabulary is coarsened to ``S`` plus one *tail bucket* holding all
      other tokens, with ``p(tail) = 1 - p(S)`` for both sides (student: exact log-sum-exp of its
      off-``S`` log-probs; teacher: ``1 - sum exp(top-k)``, floored at 1e-30). This is a proper KL
      between two distributions, so it is >= 0 and 0 iff they agree on ``S`` and on the tail; by the
      data-processing inequality it never exceeds the full-vocabulary KL, and equals it when ``S`` is
      the whole vocabulary. Crucially for a *reverse* KL it keeps the student's mass outside the
      teacher's top-k in the objective: that is exactly the mass reverse KL must push down.
    * ``"renorm"``: both distributions renormalised over ``S`` (NeMo-RL's default for top-k
      distillation). Also a proper KL, exact when ``S`` is everything, but blind to how much mass the
      student puts outside ``S``.

    verl's ``forward_kl_topk`` instead sums the raw (unnormalised) top-k terms and clamps the result at
    0; for the reverse direction that sum is not a divergence (it can be negative, and its gradient
    ignores the tail), which is why it is not offered here.

    ``student_logprobs_BTV`` may be log-probs or raw logits: it is passed through ``log_softmax``
    (a no-op on log-probs). Top-k slots with a negative id are padding (variable k per position) and
    are ignored; ids must otherwise be unique within a position and ``< V``. Teacher log-probs are
    detached and floored at log(1e-30).

    Returns:
        ``(kl_BT, student_mass_BT, teacher_mass_BT)``: float32; the masses are the probability each
        side puts on ``S`` (detached).
    """
    if topk_mode not in TOPK_MODES:
        raise ValueError(f"unknown topk_mode {topk_mode!r}; allowed: {' | '.join(TOPK_MODES)}")
    B, T, V = student_logprobs_BTV.shape
    if teacher_topk_ids_BTK.shape != teacher_topk_logprobs_BTK.shape or teacher_topk_ids_BTK.shape[:2] != (B, T):
        raise ValueError(
            f"teacher ids {tuple(teacher_topk_ids_BTK.shape)} / log-probs {tuple(teacher_topk_logprobs_BTK.shape)} "
            f"must both be [B, T, K] with [B, T] = {(B, T)}")
    if teacher_topk_ids_BTK.shape[-1] < 1:
        raise ValueError("teacher top-k needs K >= 1 entries per position")
    ids_BTK = teacher_topk_ids_BTK.long()
    if bool((ids_BTK >= V).any()):
        raise ValueError(f"teacher top-k id >= vocabulary size {V}: teacher and student vocabularies differ")
    slot_BTK = ids_BTK >= 0
    # A position without any top-k entry has no support (KL 0). Give it one dummy slot (id 0, teacher
    # log-prob 0) so that every log-sum-exp below stays finite -- a log-sum-exp over nothing is -inf
    # and its backward is NaN even when multiplied by a zero upstream gradient.
    has_BT = slot_BTK.any(dim=-1)
    slot_BTK = slot_BTK.clone()
    slot_BTK[..., 0] |= ~has_BT
    ids_safe_BTK = torch.where(slot_BTK & (ids_BTK >= 0), ids_BTK, torch.zeros_like(ids_BTK))

    logq_BTV = F.log_softmax(student_logprobs_BTV.float(), dim=-1)
    neg_inf = torch.tensor(float("-inf"), device=logq_BTV.device)
    logq_BTK = torch.where(slot_BTK, logq_BTV.gather(-1, ids_safe_BTK), neg_inf)
    logp_t_BTK = teacher_topk_logprobs_BTK.detach().float().clamp_min(_TEACHER_LOGP_FLOOR)
    logp_t_BTK = torch.where(slot_BTK, logp_t_BTK, torch.zeros_like(logp_t_BTK))  # padding: any finite value

    teacher_lse_BT = torch.where(slot_BTK, logp_t_BTK, neg_inf).logsumexp(dim=-1)
    student_lse_BT = logq_BTK.logsumexp(dim=-1)

    if topk_mode == "renorm":
        logq_hat_BTK = torch.where(slot_BTK, logq_BTK - student_lse_BT.unsqueeze(-1), neg_inf)
        logp_hat_BTK = logp_t_BTK - teacher_lse_BT.unsqueeze(-1)
        kl_BT = _kl_terms(logq_hat_BTK, logp_hat_BTK).sum(dim=-1)
    else:
        # Membership of S as a bool [B, T, V]; padding slots write into a spare column V, dropped after.
        spare_BTK = torch.where(slot_BTK, ids_safe_BTK, torch.full_like(ids_safe_BTK, V))
        in_s_BTV = torch.zeros((B, T, V + 1), dtype=torch.bool, device=logq_BTV.device)
        in_s_BTV = in_s_BTV.scatter_(-1, spare_BTK, True)[..., :V]
        # Fill S with a huge finite negative, not -inf: when S is the whole vocabulary the tail is then
        # a probability-0 bucket with a finite log-sum-exp (and a finite backward).
        student_tail_BT = logq_BTV.masked_fill(in_s_BTV, -1e30).logsumexp(dim=-1)
        teacher_tail_BT = torch.log((-torch.expm1(teacher_lse_BT.clamp(max=0.0))).clamp_min(1e-30))
        kl_BT = _kl_terms(logq_BTK, logp_t_BTK).sum(dim=-1) + _kl_terms(student_tail_BT, teacher_tail_BT)

    zeros_BT = torch.zeros_like(kl_BT)
    return (torch.where(has_BT, kl_BT, zeros_BT), torch.where(has_BT, student_lse_BT.detach().exp(), zeros_BT),
            torch.where(has_BT, teacher_lse_BT.exp(), zeros_BT))


@dataclass
class ReverseKLTerms:
    """Per-position reverse-KL results (``[B, T]``) before aggregation: what :func:`reverse_kl_loss` computes
    from the whole ``[B, T, V]`` log-probs, or what a chunked computation (``mopd.chunked_logits``) gives
    without ever building them. ``kl_BT`` carries the gradient and is 0 where ``ok_BT`` is False."""

    kl_BT: Tensor
    student_mass_BT: Tensor
    teacher_mass_BT: Tensor
    ok_BT: Tensor  # a valid position whose teacher log-probs are finite
    teacher_nan_BT: Tensor  # a position whose teacher log-probs hold NaN or +inf (dropped)


def sanitize_teacher_topk(teacher_topk_ids_BTK: Tensor, teacher_topk_logprobs_BTK: Tensor,
                          mask_BT: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ok_BT, teacher_nan_BT, ids_BTK, logprobs_BTK)``: masked positions and positions with a NaN / +inf
    teacher log-prob get no top-k slot (id -1, log-prob 0), so they give KL 0 and a finite gradient."""
    valid_BT = mask_BT.bool()
    slot_BTK = teacher_topk_ids_BTK >= 0
    bad_BTK = torch.isnan(teacher_topk_logprobs_BTK) | torch.isposinf(teacher_topk_logprobs_BTK)
    teacher_nan_BT = (bad_BTK & slot_BTK).any(dim=-1)
    ok_BT = valid_BT & ~teacher_nan_BT
    ids_BTK = torch.where(ok_BT.unsqueeze(-1), teacher_topk_ids_BTK.long(),
                          torch.full_like(teacher_topk_ids_BTK.long(), -1))
    t_logp_BTK = torch.where(ok_BT.unsqueeze(-1), teacher_topk_logprobs_BTK.detach().float(),
                             torch.zeros_like(teacher_topk_logprobs_BTK, dtype=torch.float32))
    return ok_BT, teacher_nan_BT, ids_BTK, t_logp_BTK


def reverse_kl_loss(
    student_logprobs_BTV: Tensor,
    teacher_topk_ids_BTK: Tensor,
    teacher_topk_logprobs_BTK: Tensor,
    weights_BT: Tensor | None,
    mask_BT: Tensor,
    *,
    topk_mode: Literal["tail", "renorm"] = "tail",
    agg_mode: AggMode | str = "seq-mean-token-mean",
    group_B: Tensor | None = None,
    norm: AggNorm | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Reverse KL ``sum_v p_theta(v) (log p_theta(v) - log p_teacher(v))`` at every response position.

    Why reverse KL on the student's own samples: it is mode-seeking (the student is penalised for mass
    where the teacher has little) and, evaluated at the student's own prefixes, it is the exact
    per-position expectation that the sampled-token MOPD advantage estimates with one sample -- lower
    variance, at the price of the teacher's top-k (or full) distribution. Top-k handling: see
    :func:`reverse_kl_per_token` (``"tail"`` bucket by default; exact when k = V).

    Aggregation: per-position KL times ``w_t`` (detached), then :func:`agg_loss` with ``agg_mode`` (default
    token-mean per sequence, mean over sequences), ``group_B`` and ``norm``. Gradient flows only into
    ``student_logprobs_BTV``. A valid position whose teacher log-probs contain NaN or +inf is dropped
    (weight 0) and counted.

    ``temperature`` != 1 compares the two distributions tempered, ``softmax(logits / T)`` on both sides (what
    TRL's distillation loss does at a sampling temperature T), instead of the models' own. Tempering needs
    only log-probs: ``log_softmax(log p / T) = log_softmax(logits / T)``; the teacher's is renormalised over
    the slots it sent, so it is exact for the whole vocabulary (``teacher_top_k = -1``, which the config asks for).

    Returns:
        ``(loss, metrics)``; metrics: ``distillation/loss``, ``distillation/reverse_kl`` (unweighted token
        mean), ``distillation/student_mass`` / ``distillation/teacher_mass`` (mean top-k mass, as in
        verl), ``distillation/nonfinite_frac``.
    """
    valid_BT = mask_BT.bool()
    if valid_BT.shape != student_logprobs_BTV.shape[:2]:
        raise ValueError(f"mask {tuple(mask_BT.shape)} does not match student [B, T] "
                         f"{tuple(student_logprobs_BTV.shape[:2])}")
    ok_BT, teacher_nan_BT, ids_BTK, t_logp_BTK = sanitize_teacher_topk(teacher_topk_ids_BTK,
                                                                         teacher_topk_logprobs_BTK, mask_BT)
    if temperature != 1.0:
        student_logprobs_BTV = (student_logprobs_BTV / temperature).log_softmax(-1)
        slot_BTK = ids_BTK >= 0
        t_BTK = torch.where(slot_BTK, t_logp_BTK / temperature, torch.full_like(t_logp_BTK, -torch.inf))
        lse_BT1 = torch.logsumexp(t_BTK, -1, keepdim=True)
        t_logp_BTK = torch.where(slot_BTK, t_BTK - torch.where(torch.isfinite(lse_BT1), lse_BT1, 0.0), 0.0)
    # Masked / NaN positions: make every input a harmless constant before any arithmetic.
    student_BTV = torch.where(ok_BT.unsqueeze(-1), student_logprobs_BTV, torch.zeros_like(student_logprobs_BTV))
    kl_BT, s_mass_BT, t_mass_BT = reverse_kl_per_token(student_BTV, ids_BTK, t_logp_BTK, topk_mode=topk_mode)
    terms = ReverseKLTerms(kl_BT, s_mass_BT, t_mass_BT, ok_BT, teacher_nan_BT)
    return reverse_kl_loss_from_terms(terms, weights_BT, mask_BT, agg_mode=agg_mode, group_B=group_B, norm=norm)


def reverse_kl_loss_from_terms(
    terms: ReverseKLTerms,
    weights_BT: Tensor | None,
    mask_BT: Tensor,
    *,
    agg_mode: AggMode | str = "seq-mean-token-mean",
    group_B: Tensor | None = None,
    norm: AggNorm | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The aggregation half of :func:`reverse_kl_loss` (same loss and metrics), from per-position terms."""
    valid_BT, ok_BT, kl_BT = mask_BT.bool(), terms.ok_BT, terms.kl_BT
    w_BT = ok_BT.float() if weights_BT is None else torch.where(ok_BT, weights_BT.detach().float(),
                                                                 torch.zeros_like(kl_BT))
    loss = agg_loss(kl_BT * w_BT, mask_BT, agg_mode, group_B, norm=norm)

    n_valid = int(valid_BT.sum().item())
    n_ok = max(int(ok_BT.sum().item()), 1)
    kl_d = kl_BT.detach()
    metrics = {
        "distillation/loss": loss.item(),
        "distillation/reverse_kl": float((kl_d * ok_BT).sum().item()) / n_ok,
        "distillation/student_mass": float((terms.student_mass_BT * ok_BT).sum().item()) / n_ok,
        "distillation/teacher_mass": float((terms.teacher_mass_BT * ok_BT).sum().item()) / n_ok,
        "distillation/nonfinite_frac": float(terms.teacher_nan_BT[valid_BT].sum().item()) / max(n_valid, 1),
    }
    return loss, metrics


def token_entropy(logits_BTV: Tensor, mask_BT: Tensor) -> Tensor:
    """Token-mean (over valid positions) of the policy entropy ``-sum_v p(v) log p(v)`` -- ``actor/entropy``.

    Why track it: entropy collapse is the usual first sign that distillation or RL is over-sharpening
    the student. Accepts logits or log-probs (``log_softmax`` is a no-op on log-probs). Differentiable
    (usable as a bonus term); call ``.item()`` for the metric. 0 when no position is valid.
    """
    valid_BT = mask_BT.bool()
    if valid_BT.shape != logits_BTV.shape[:2]:
        raise ValueError(f"mask {tuple(mask_BT.shape)} does not match logits [B, T] {tuple(logits_BTV.shape[:2])}")
    x_BTV = torch.where(valid_BT.unsqueeze(-1), logits_BTV, torch.zeros_like(logits_BTV))
    logp_BTV = F.log_softmax(x_BTV.float(), dim=-1)
    ent_BT = -_kl_terms(logp_BTV, torch.zeros_like(logp_BTV)).sum(dim=-1)
    ent_BT = torch.where(valid_BT, ent_BT, torch.zeros_like(ent_BT))
    return ent_BT.sum() / valid_BT.sum().clamp_min(1)
