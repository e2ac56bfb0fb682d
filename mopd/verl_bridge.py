"""verl bridge: MOPD's advantage and its IcePop / TIS policy losses as entries of verl's own registries.

A verl user keeps verl's trainer, workers and configs and switches the algorithm by name::

    algorithm.adv_estimator=mopd
    actor_rollout_ref.actor.policy_loss.loss_mode=mopd_icepop      # or mopd_tis
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean      # MiMo Eq. 7: token-mean per sequence
    algorithm.rollout_correction.rollout_is=token                  # verl hands the loss pi_old / pi_rollout
    algorithm.rollout_correction.rollout_is_threshold=0.5_5.0      # (or any float above the IcePop band)
    actor_rollout_ref.actor.ppo_epochs=1                           # one optimizer step per batch (below)
    actor_rollout_ref.actor.ppo_mini_batch_size=<data.train_batch_size>

Registration happens on import. This package declares a ``verl.plugins`` entry point, and ``import verl``
loads those in every process (the driver that computes advantages and the workers that compute the
loss), so an installed mopd needs no extra flag; ``VERL_USE_EXTERNAL_PLUGINS=none`` turns that off,
and ``import mopd.verl_bridge`` / :func:`register` then do it by hand.

What the functions read, given what verl passes them (``compute_advantage`` in
``verl/trainer/ppo/ray_trainer.py`` calls a registered estimator with ``token_level_rewards``,
``response_mask``, ``config`` and, when present, ``index`` = the ``uid`` of each sample's prompt):

* ``token_level_rewards`` carries the dense MOPD reward ``log pi_teacher(y_t) - log pi_student(y_t)`` of
  each response token. verl passes neither teacher nor old log-probs to estimators (its own teacher loop's
  ``teacher_logprobs`` included), so the difference has to arrive already formed: a reward manager scores
  the response with the teacher and writes it per token. verl computes ``pi_old`` only after the reward
  stage, so there the student term is the rollout's own log-prob (``rollout_log_probs``), which IcePop keeps
  close to ``pi_old``. A score the reward function adds at the last token adds to that token's advantage.
* the group-normalised outcome term ``alpha * A_orm`` (MiMo Eq. 8-9) needs one verifier score per sample,
  which verl's stock ``compute_advantage`` does not pass: callers that have it (a verl trainer subclass,
  mopd's own tests) pass ``outcome_scores=`` and ``alpha_orm=``.
* the losses get ``rollout_is_weights`` = ``pi_old / pi_rollout`` per token from verl's rollout correction
  and apply mopd's own IcePop band / TIS cap to it. Since verl may already have truncated or masked those
  weights, what survives is the stricter of verl's setting and mopd's; a TIS-style float threshold at or
  below the IcePop upper bound would let out-of-band tokens through, hence the band string above.
* the dense reward is clamped to ``[-advantage_clip, advantage_clip]`` (mopd's ``algorithm.advantage_clip``,
  default 10, as verl's ``distillation_loss.loss_max_clamp``); the estimator reads ``advantage_clip`` from
  the config verl passes (``+algorithm.advantage_clip=...``; null disables) or from an explicit keyword.
  The clamp applies to ``token_level_rewards`` as given, so a last-token outcome score is clamped with it.

**One optimizer step per batch.** The losses are the REINFORCE form of MiMo Eq. 7
(``-w * A * log pi_theta``), whose gradient is the policy gradient only while ``pi_theta = pi_old``, i.e.
for the first optimizer step on a batch; they have no PPO ratio or clip. So run verl with
``actor_rollout_ref.actor.ppo_epochs=1`` and ``actor_rollout_ref.actor.ppo_mini_batch_size`` equal to
``data.train_batch_size`` (one mini-batch). The loss enforces what it can see: ``ppo_epochs > 1`` in the
actor config it receives is refused with a ValueError; several mini-batches are not visible in that
config (it lacks the train batch size), so the loss compares ``log_prob`` with ``old_log_prob`` and warns
(``OffPolicyWarning``, once per loss function, i.e. per worker process) when their mean absolute
difference over valid tokens exceeds ``offpolicy_tol`` (default 1e-2; ``register(offpolicy_tol=...)``
changes it); it also reports verl's ``actor/ppo_kl`` (token mean of ``old_log_prob - log_prob``, as
verl's own REINFORCE loss does) on every call. A warning rather than an error: bf16 recomputation under
another micro-batch layout can move log-probs with unchanged weights, and no fixed tolerance separates
that noise from the drift of a small optimizer step.

All arithmetic is mopd's (``rewards.advantages``, ``stability.correction``, ``mopd.losses``); this module
only adapts signatures and verl's global-batch loss scaling.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mopd.config import AlgorithmConfig
from mopd.losses import pg_loss
from rewards.advantages import (
    DEFAULT_ADVANTAGE_CLIP,
    combine_advantages,
    grpo_outcome_advantage,
    mopd_advantage,
)
from stability.correction import icepop_weights, tis_weights, zero_weight_fraction

__all__ = ["ADV_ESTIMATOR", "POLICY_LOSSES", "OFFPOLICY_TOL", "OffPolicyWarning", "register", "mopd_adv_estimator",
           "make_policy_losses"]

ADV_ESTIMATOR = "mopd"
POLICY_LOSSES = ("mopd_icepop", "mopd_tis")
_D = AlgorithmConfig()
_ADV_CLIP = getattr(_D, "advantage_clip", DEFAULT_ADVANTAGE_CLIP)
#: Mean |log_prob - old_log_prob| over valid tokens above which the REINFORCE-form loss warns.
OFFPOLICY_TOL = 1e-2
_FROM_CONFIG: Any = object()  # "advantage_clip not passed": read it from verl's config
_ISW_HINT = ("set algorithm.rollout_correction.rollout_is=token and "
             "algorithm.rollout_correction.rollout_is_threshold=0.5_5.0 (the rollout must return its "
             "log-probs: actor_rollout_ref.rollout.calculate_log_probs=true)")


class OffPolicyWarning(RuntimeWarning):
    """The policy being trained is no longer the one that computed ``old_log_prob`` (see the module doc)."""


def mopd_adv_estimator(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Sequence[Any] | Tensor | None = None,
    config: Any = None,
    outcome_scores: Tensor | None = None,
    alpha_orm: float = 0.0,
    advantage_clip: float | None = _FROM_CONFIG,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``"mopd"``:
    ``A[t] = clamp((log pi_T - log pi_old)[t], +-advantage_clip) + alpha_orm * A_orm``.

    ``token_level_rewards`` holds the dense reward already formed (see the module docstring for why).
    ``advantage_clip`` not given: ``config.advantage_clip`` if the config has it, else mopd's default (10);
    None: no clamp. Returns ``(advantages, returns)`` as verl expects; for a critic-free method both are
    the advantage.
    """
    if advantage_clip is _FROM_CONFIG:
        advantage_clip = config.get("advantage_clip", _ADV_CLIP) if hasattr(config, "get") else _ADV_CLIP
    a_mopd = mopd_advantage(token_level_rewards, torch.zeros_like(token_level_rewards), response_mask,
                            clip=advantage_clip)
    a_orm = None
    if alpha_orm:
        if outcome_scores is None or index is None:
            raise ValueError(
                f"mopd advantage: alpha_orm={alpha_orm} needs outcome_scores (one verifier score per sample) "
                "and index (the prompt uid of each sample); verl's stock compute_advantage passes neither, "
                "so pass them from your trainer or use alpha_orm=0 (pure on-policy distillation)")
        norm = config.get("norm_adv_by_std_in_grpo", True) if hasattr(config, "get") else True
        a_orm = grpo_outcome_advantage(outcome_scores, index, normalize_std=bool(norm))
    adv = combine_advantages(a_mopd, a_orm, alpha_orm, response_mask).to(token_level_rewards.dtype)
    return adv, adv


def _policy_loss(name: str, weights_of: Callable[[Tensor, Tensor], Tensor],
                 offpolicy_tol: float = OFFPOLICY_TOL) -> Callable[..., tuple[Tensor, dict]]:
    warned = False

    def loss_fn(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "seq-mean-token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        nonlocal warned
        if rollout_is_weights is None:
            raise ValueError(f"verl policy loss {name!r} needs the rollout IS ratios pi_old/pi_rollout: {_ISW_HINT}")
        if loss_agg_mode != "seq-mean-token-mean":
            raise ValueError(
                f"verl policy loss {name!r} is the token-mean-per-sequence loss of MiMo Eq. 7; got "
                f"loss_agg_mode={loss_agg_mode!r}: set actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean")
        epochs = getattr(config, "ppo_epochs", 1) or 1
        if epochs > 1:
            raise ValueError(
                f"verl policy loss {name!r} is the REINFORCE form of MiMo Eq. 7 (no PPO ratio or clip), valid for "
                f"one optimizer step per batch; got actor ppo_epochs={epochs}: set "
                "actor_rollout_ref.actor.ppo_epochs=1 and actor_rollout_ref.actor.ppo_mini_batch_size equal to "
                "data.train_batch_size, or use a PPO loss mode")
        valid = response_mask.bool()
        n_valid = valid.sum().clamp_min(1)
        drift = (log_prob.detach().float() - old_log_prob.detach().float()).masked_fill(~valid, 0.0)
        ppo_kl = (-drift.sum() / n_valid).item()
        mean_abs = (drift.abs().sum() / n_valid).item()
        if mean_abs > offpolicy_tol and not warned:
            warned = True
            warnings.warn(
                f"verl policy loss {name!r}: log_prob differs from old_log_prob by {mean_abs:.3g} on average "
                f"(tolerance {offpolicy_tol:g}), so verl is taking several optimizer steps per batch; this loss "
                "is the REINFORCE form, exact only for the first step: set actor_rollout_ref.actor.ppo_epochs=1 "
                "and actor_rollout_ref.actor.ppo_mini_batch_size equal to data.train_batch_size "
                "(warned once per loss function)", OffPolicyWarning, stacklevel=2)
        # verl's weight k = pi_old / pi_rollout (0 where it masked) -> log k against a zero "rollout" log-prob,
        # so mopd's own band/cap functions decide; log(0) = -inf is treated by them as a masked token.
        log_k = torch.log(rollout_is_weights.detach().float())
        weights = weights_of(log_k, response_mask)
        loss, _ = pg_loss(log_prob, advantages, weights, response_mask)
        # verl sums micro-batch losses and normalises by the *global* number of sequences; mopd's loss is a
        # mean over this micro-batch's sequences, so rescale it to verl's convention when verl gives one.
        info = getattr(config, "global_batch_info", None) or {}
        if info.get("global_batch_size"):
            n_seq = (response_mask.bool().sum(dim=-1) > 0).sum()
            loss = loss * n_seq / info["global_batch_size"] * (info.get("dp_size") or 1)
        return loss, {"icepop/masked_frac": zero_weight_fraction(weights, response_mask), "actor/ppo_kl": ppo_kl}

    loss_fn.__name__ = loss_fn.__qualname__ = f"{name}_policy_loss"
    return loss_fn


def make_policy_losses(icepop_low: float = _D.icepop_low, icepop_high: float = _D.icepop_high,
                       tis_cap: float = _D.tis_cap,
                       offpolicy_tol: float = OFFPOLICY_TOL) -> dict[str, Callable[..., tuple[Tensor, dict]]]:
    """The two verl-signature policy losses for a given IcePop band and TIS cap (defaults: mopd's) and
    off-policy warning tolerance (see the module docstring)."""
    def icepop(log_k: Tensor, mask: Tensor) -> Tensor:
        return icepop_weights(log_k, torch.zeros_like(log_k), mask, low=icepop_low, high=icepop_high)

    def tis(log_k: Tensor, mask: Tensor) -> Tensor:
        return tis_weights(log_k, torch.zeros_like(log_k), mask, cap=tis_cap)

    return {"mopd_icepop": _policy_loss("mopd_icepop", icepop, offpolicy_tol),
            "mopd_tis": _policy_loss("mopd_tis", tis, offpolicy_tol)}


def register(icepop_low: float = _D.icepop_low, icepop_high: float = _D.icepop_high,
             tis_cap: float = _D.tis_cap, offpolicy_tol: float = OFFPOLICY_TOL) -> None:
    """Register ``"mopd"`` and the policy losses in verl's registries; calling it again is harmless
    (the estimator is one module-level function, and a loss re-registered replaces the previous one)."""
    from verl.trainer.ppo import core_algos

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR) is not mopd_adv_estimator:
        core_algos.register_adv_est(ADV_ESTIMATOR)(mopd_adv_estimator)
    for name, fn in make_policy_losses(icepop_low, icepop_high, tis_cap, offpolicy_tol).items():
        core_algos.register_policy_loss(name)(fn)


register()
