"""The verl bridge, called through verl's own registries with the arguments verl's call sites pass, against
mopd's own functions (and verl's own aggregation as an independent oracle)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from omegaconf import OmegaConf

import mopd.verl_bridge as bridge
from mopd.losses import pg_loss
from rewards.advantages import combine_advantages, grpo_outcome_advantage, mopd_advantage
from stability.correction import icepop_weights, tis_weights

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

B, T = 6, 9


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 5, 1, 7, 0, 3])  # one empty response
    mask = (torch.arange(T) < lengths[:, None]).float()
    old = -torch.rand(B, T, generator=g) * 3
    rollout = old - torch.randn(B, T, generator=g) * 1.2  # log k ~ N(0, 1.2): plenty outside [0.5, 5]
    teacher = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, T, generator=g)
    return mask, old, rollout, teacher, adv


def _actor_config(**kw) -> ActorConfig:
    return ActorConfig(strategy="fsdp", ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=4, rollout_n=1,
                       loss_agg_mode="seq-mean-token-mean", **kw)


def _verl_is_weights(old, rollout, mask, threshold):
    w, _ = compute_rollout_correction_weights(old - rollout, mask, rollout_is="token", rollout_is_threshold=threshold)
    return w


def test_adv_estimator_through_verl_lookup_equals_mopd_advantage():
    mask, old, _, teacher, _ = _batch()
    teacher[0, 3] = float("nan")  # a teacher position without a log-prob: advantage 0, not NaN
    uid = ["p0", "p0", "p1", "p1", "p2", "p2"]
    fn = core_algos.get_adv_estimator_fn("mopd")
    # The keyword arguments verl's compute_advantage builds for a registered estimator.
    adv, ret = fn(token_level_rewards=teacher - old, response_mask=mask, config=AlgoConfig(), index=uid)
    expected = mopd_advantage(teacher, old, mask)
    assert torch.equal(adv, expected) and torch.equal(ret, expected)
    assert adv[0, 3] == 0 and bool((adv[mask == 0] == 0).all())

    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    adv2, _ = fn(token_level_rewards=teacher - old, response_mask=mask, config=AlgoConfig(), index=uid,
                 outcome_scores=scores, alpha_orm=0.5)
    orm = grpo_outcome_advantage(scores, uid)
    assert torch.equal(adv2, combine_advantages(expected, orm, 0.5, mask))
    with pytest.raises(ValueError, match="outcome_scores"):
        fn(token_level_rewards=teacher - old, response_mask=mask, config=AlgoConfig(), alpha_orm=0.5)


@pytest.mark.parametrize("threshold", ["0.5_5.0", 1e6])  # verl's own IcePop, or plain ratios
def test_icepop_loss_through_verl_lookup_matches_mopd_and_masks_gradient(threshold):
    mask, old, rollout, _, adv = _batch(1)
    w = _verl_is_weights(old, rollout, mask, threshold)
    logp = (old + 0.001 * torch.randn(B, T)).requires_grad_(True)  # first step: pi_theta ~ pi_old
    loss, metrics = core_algos.get_policy_loss_fn("mopd_icepop")(
        old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
        loss_agg_mode="seq-mean-token-mean", config=_actor_config(), rollout_is_weights=w)

    ref_w = icepop_weights(old, rollout, mask, low=0.5, high=5.0)
    ref_logp = logp.detach().clone().requires_grad_(True)
    ref_loss, _ = pg_loss(ref_logp, adv, ref_w, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    # verl's own aggregation of the Eq. 7 per-token loss as an independent oracle.
    verl_loss = core_algos.agg_loss(-ref_w * adv * logp.detach(), mask, "seq-mean-token-mean")
    torch.testing.assert_close(loss.detach(), verl_loss, rtol=1e-5, atol=1e-7)

    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(logp.grad, ref_logp.grad, rtol=1e-6, atol=1e-8)
    k = torch.exp(old - rollout)
    valid = mask.bool()
    out_of_band = valid & ((k < 0.5) | (k > 5.0))
    in_band = valid & ~out_of_band
    assert out_of_band.sum() >= 5 and in_band.sum() >= 5  # the batch really exercises both sides
    assert bool((logp.grad[out_of_band] == 0).all()) and bool((logp.grad[~valid] == 0).all())
    assert bool((logp.grad[in_band] != 0).all())  # gradient flows through every kept token
    assert metrics["icepop/masked_frac"] == pytest.approx(float(out_of_band.sum() / valid.sum()))


def test_adv_estimator_clips_dense_reward():
    mask, _, _, _, _ = _batch()
    rewards = torch.linspace(-25, 25, B * T).reshape(B, T)
    fn = core_algos.get_adv_estimator_fn("mopd")
    adv, _ = fn(token_level_rewards=rewards, response_mask=mask, config=AlgoConfig())  # mopd's default: 10
    torch.testing.assert_close(adv, rewards.clamp(-10, 10) * mask)
    adv, _ = fn(token_level_rewards=rewards, response_mask=mask, config=OmegaConf.create({"advantage_clip": 3.0}))
    torch.testing.assert_close(adv, rewards.clamp(-3, 3) * mask)
    adv, _ = fn(token_level_rewards=rewards, response_mask=mask, config=OmegaConf.create({"advantage_clip": None}))
    torch.testing.assert_close(adv, rewards * mask)
    adv, _ = fn(token_level_rewards=rewards, response_mask=mask, config=AlgoConfig(), advantage_clip=5.0)
    torch.testing.assert_close(adv, rewards.clamp(-5, 5) * mask)


def test_loss_refuses_several_ppo_epochs():
    mask, old, rollout, _, adv = _batch()
    fn = core_algos.get_policy_loss_fn("mopd_icepop")
    with pytest.raises(ValueError, match="ppo_epochs=1"):
        fn(old, old, adv, mask, "seq-mean-token-mean", _actor_config(ppo_epochs=2),
           _verl_is_weights(old, rollout, mask, "0.5_5.0"))


def test_loss_warns_once_when_policy_moved_since_old_log_prob():
    """A second mini-batch (or epoch) sees log_prob != old_log_prob: the REINFORCE form is then off."""
    mask, old, rollout, _, adv = _batch(4)
    w = _verl_is_weights(old, rollout, mask, "0.5_5.0")
    fn = bridge.make_policy_losses()["mopd_icepop"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on-policy (and recompute noise below the tolerance): silent
        _, m = fn(old, old + 1e-3, adv, mask, "seq-mean-token-mean", _actor_config(), w)
    assert m["actor/ppo_kl"] == pytest.approx(-1e-3, rel=1e-3)
    moved = old - 0.05
    with pytest.warns(bridge.OffPolicyWarning, match="ppo_mini_batch_size"):
        loss, m = fn(old, moved, adv, mask, "seq-mean-token-mean", _actor_config(), w)
    assert m["actor/ppo_kl"] == pytest.approx(0.05, rel=1e-4)  # verl's sign: mean(old_log_prob - log_prob)
    ref, _ = pg_loss(moved, adv, icepop_weights(old, rollout, mask), mask)
    torch.testing.assert_close(loss, ref)  # the loss itself is unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per loss function, not every micro-batch
        fn(old, moved, adv, mask, "seq-mean-token-mean", _actor_config(), w)
    strict = bridge.make_policy_losses(offpolicy_tol=1e-4)["mopd_tis"]
    with pytest.warns(bridge.OffPolicyWarning):
        strict(old, old + 1e-3, adv, mask, "seq-mean-token-mean", _actor_config(), w)


def test_tis_loss_matches_mopd():
    mask, old, rollout, _, adv = _batch(2)
    w = _verl_is_weights(old, rollout, mask, 1e6)
    logp = old.clone().requires_grad_(True)
    loss, _ = core_algos.get_policy_loss_fn("mopd_tis")(old, logp, adv, mask, "seq-mean-token-mean",
                                                         _actor_config(), w)
    ref, _ = pg_loss(logp, adv, tis_weights(old, rollout, mask, cap=2.0), mask)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)


def test_global_batch_scaling_follows_verl():
    """With verl's global batch info (data parallel / micro-batches) the loss is scaled as verl's own
    seq-mean-token-mean aggregation scales it."""
    mask, old, rollout, _, adv = _batch(3)
    w = _verl_is_weights(old, rollout, mask, "0.5_5.0")
    cfg = _actor_config()
    cfg.global_batch_info.update(dp_size=2, global_batch_size=16, batch_num_tokens=None)
    loss, _ = core_algos.get_policy_loss_fn("mopd_icepop")(old, old, adv, mask, "seq-mean-token-mean", cfg, w)
    ref_w = icepop_weights(old, rollout, mask)
    verl_loss = core_algos.agg_loss(-ref_w * adv * old, mask, "seq-mean-token-mean", dp_size=2, global_batch_size=16)
    torch.testing.assert_close(loss, verl_loss, rtol=1e-5, atol=1e-7)


def test_policy_loss_refuses_missing_weights_and_other_aggregation():
    mask, old, rollout, _, adv = _batch()
    fn = core_algos.get_policy_loss_fn("mopd_icepop")
    with pytest.raises(ValueError, match="rollout_is=token"):
        fn(old, old, adv, mask, "seq-mean-token-mean", _actor_config(), None)
    with pytest.raises(ValueError, match="loss_agg_mode=seq-mean-token-mean"):
        fn(old, old, adv, mask, "token-mean", _actor_config(), _verl_is_weights(old, rollout, mask, 1e6))


def test_double_registration_is_harmless():
    before = core_algos.get_adv_estimator_fn("mopd")
    bridge.register()
    bridge.register()
    assert core_algos.get_adv_estimator_fn("mopd") is before is bridge.mopd_adv_estimator
    assert core_algos.get_policy_loss_fn("mopd_icepop").__name__ == "mopd_icepop_policy_loss"


_PROBE = """
import sys
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
def reachable():
    try:
        get_adv_estimator_fn("mopd"), get_policy_loss_fn("mopd_icepop"), get_policy_loss_fn("mopd_tis")
        return True
    except ValueError:
        return False
print("before", reachable())
import mopd.verl_bridge
print("after", reachable())
"""


@pytest.mark.parametrize("plugins,before", [("none", False), ("auto", True)])
def test_reachable_only_after_registration(plugins, before):
    """Plugins off: verl knows nothing of mopd until the bridge is imported. Plugins on (verl's default):
    `import verl` itself loads the bridge through the `verl.plugins` entry point, as in every verl worker."""
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": plugins, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"before {before}" in out.stdout and "after True" in out.stdout, out.stdout + out.stderr[-2000:]
