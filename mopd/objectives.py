"""Training objectives as a registry (verl's `register_policy_loss` pattern): adding an objective touches
this file only. Each objective says which advantage it trains on, what it needs from the teachers, and
how one micro-batch's loss is formed from the pure functions in `mopd/losses.py`.

`algorithm.objective` names one of `OBJECTIVES`; the trainer and the batch producer read the flags
instead of comparing strings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from mopd.config import AlgorithmConfig
from mopd.losses import AggNorm, ReverseKLTerms, pg_loss, reverse_kl_loss, reverse_kl_loss_from_terms


@dataclass
class LossInputs:
    """One micro-batch as the loss sees it (all `[b, T]` unless noted)."""

    logprobs_BT: Tensor  # log pi_theta of the sampled tokens, with gradient
    logprobs_BTV: Tensor | None  # full log-softmax, with gradient (None: computed in chunks, see reverse_kl)
    advantages_BT: Tensor
    weights_BT: Tensor | None  # train/inference correction (None: no correction)
    mask_BT: Tensor
    old_logprobs_BT: Tensor | None  # pi_old, for PPO clipping when several epochs run per batch
    teacher_topk_ids_BTK: Tensor | None
    teacher_topk_logprobs_BTK: Tensor | None
    # `algorithm.loss_agg_mode`: the domain index of every row (`[b]`, ids of the whole batch, for
    # domain-balanced) and the whole batch's normalisers, so that the row-weighted sum of micro-batch
    # losses is the whole-batch loss (`mopd.losses.agg_loss`). None: this micro-batch is the batch.
    domain_B: Tensor | None = None
    agg_norm: AggNorm | None = None
    # `trainer.logits_chunk_tokens` > 0: the per-position reverse KL to the teachers' top-k, computed chunk by
    # chunk from the hidden states (mopd.chunked_logits) instead of from logprobs_BTV, which is then None.
    reverse_kl: ReverseKLTerms | None = None


LossFn = Callable[[LossInputs, AlgorithmConfig], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Objective:
    name: str
    loss: LossFn
    advantage: str  # "mopd": teacher log-ratio (+ alpha_orm x outcome); "orm": outcome only; "none"
    needs_teacher_scores: bool = True  # the teachers score the student's samples
    needs_teacher_topk: bool = False  # ... with their top-k (or full) distribution
    teacher_samples: bool = False  # the data are the teachers' own samples (off-policy baseline)
    corrected: bool = True  # IcePop/TIS weights apply (the samples come from the student's engine)


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, **flags: object) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = Objective(name=name, loss=fn, **flags)  # type: ignore[arg-type]
        return fn

    return deco


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[str(getattr(name, "value", name))]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; registered: {sorted(OBJECTIVES)}") from None


def _pg(x: LossInputs, a: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    several = a.ppo_epochs > 1  # PPO's clipped surrogate only when the batch is reused
    return pg_loss(x.logprobs_BT, x.advantages_BT, x.weights_BT, x.mask_BT,
                   x.old_logprobs_BT if several else None, a.ppo_clip if several else None,
                   agg_mode=str(a.loss_agg_mode), group_B=x.domain_B, norm=x.agg_norm)


def _kl(x: LossInputs, a: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    if x.teacher_topk_ids_BTK is None or x.teacher_topk_logprobs_BTK is None:
        raise ValueError(f"algorithm.objective={a.objective} needs the teachers' top-k log-probs, but the batch has "
                         "none; set algorithm.teacher_top_k (-1 = whole vocabulary)")
    agg = {"agg_mode": str(a.loss_agg_mode), "group_B": x.domain_B, "norm": x.agg_norm}
    if x.reverse_kl is not None:
        return reverse_kl_loss_from_terms(x.reverse_kl, x.weights_BT, x.mask_BT, **agg)
    assert x.logprobs_BTV is not None
    return reverse_kl_loss(x.logprobs_BTV, x.teacher_topk_ids_BTK, x.teacher_topk_logprobs_BTK, x.weights_BT,
                           x.mask_BT, **agg)


@register_objective("pg", advantage="mopd")
def pg_objective(x: LossInputs, a: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """MiMo-V2-Flash Eq. 7: REINFORCE on the sampled-token MOPD advantage (PPO-clipped with ppo_epochs > 1)."""
    return _pg(x, a)


@register_objective("reverse_kl", advantage="mopd", needs_teacher_topk=True)
def reverse_kl_objective(x: LossInputs, a: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """Exact reverse KL to the teacher's top-k (or full) distribution at every response position."""
    return _kl(x, a)


@register_objective("mixed", advantage="mopd", needs_teacher_topk=True)
def mixed_objective(x: LossInputs, a: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """pg + kl_coef x reverse KL: the sampled-token term plus the lower-variance top-k term."""
    pg, m = _pg(x, a)
    kl, mk = _kl(x, a)
    return pg + a.kl_coef * kl, {**m, **mk}


@register_objective("orm", advantage="orm", needs_teacher_scores=False)
def orm_objective(x: LossInputs, a: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """Outcome-only RL baseline: GRPO advantages from the verifiers, no teacher."""
    return _pg(x, a)


@register_objective("sft", advantage="none", needs_teacher_scores=False, teacher_samples=True, corrected=False)
def sft_objective(x: LossInputs, a: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """Off-policy baseline: NLL of the teachers' own samples (pg_loss with A = 1, w = 1), aggregated by
    `algorithm.loss_agg_mode` like the other objectives."""
    loss, _ = pg_loss(x.logprobs_BT, x.mask_BT, None, x.mask_BT, agg_mode=str(a.loss_agg_mode),
                      group_B=x.domain_B, norm=x.agg_norm)
    return loss, {"actor/sft_loss": loss.item()}
