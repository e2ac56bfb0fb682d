"""rewards/advantages.py: hand-computed values, edge cases, and agreement with verl's GRPO advantage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rewards.advantages import (
    ADVANTAGE_NORMS,
    DEFAULT_ADVANTAGE_CLIP,
    advantage_metrics,
    combine_advantages,
    grpo_outcome_advantage,
    mopd_advantage,
    normalize_advantage,
)


def test_mopd_advantage_hand_values_and_mask():
    teacher = torch.tensor([[-1.0, -2.0, -3.0], [-0.1, -0.2, -0.3]])
    student = torch.tensor([[-1.5, -1.0, -9.0], [-0.4, -0.2, -0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    a = mopd_advantage(teacher, student, mask)
    expected = torch.tensor([[0.5, -1.0, 0.0], [0.3, 0.0, 0.0]])
    torch.testing.assert_close(a, expected)


def test_mopd_advantage_is_detached():
    student = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    a = mopd_advantage(torch.tensor([[-0.5, -0.5]]), student, torch.ones(1, 2))
    assert not a.requires_grad


def test_mopd_advantage_nonfinite_inputs_give_zero():
    nan, inf = float("nan"), float("inf")
    teacher = torch.tensor([[nan, -1.0, nan, -inf]])
    student = torch.tensor([[-1.0, -2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0, 1]])
    a = mopd_advantage(teacher, student, mask)
    torch.testing.assert_close(a, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_mopd_advantage_clipped_at_ten_by_default():
    teacher = torch.tensor([[-31.0, -1.0, -0.5, -40.0, -2.0]])
    student = torch.tensor([[-1.0, -12.0, -0.25, -1.0, -9.5]])
    mask = torch.tensor([[1, 1, 1, 0, 1]])
    a = mopd_advantage(teacher, student, mask)
    torch.testing.assert_close(a, torch.tensor([[-10.0, 10.0, -0.25, 0.0, 7.5]]))
    torch.testing.assert_close(mopd_advantage(teacher, student, mask, clip=2.0),
                               torch.tensor([[-2.0, 2.0, -0.25, 0.0, 2.0]]))
    torch.testing.assert_close(mopd_advantage(teacher, student, mask, clip=None),
                               torch.tensor([[-30.0, 11.0, -0.25, 0.0, 7.5]]))
    assert DEFAULT_ADVANTAGE_CLIP == 10.0


def test_mopd_advantage_clip_matches_verl_k1_clamp():
    """verl's on-policy distillation reward is -clamp(k1, -10, 10) with k1 = log pi_student - log pi_teacher."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl (test oracle) not importable")
    g = torch.Generator().manual_seed(0)
    student = -torch.rand(4, 7, generator=g) * 3
    teacher = -torch.rand(4, 7, generator=g) * 30  # many beyond the clamp
    mask = torch.ones(4, 7)
    k1 = core_algos.kl_penalty(student, teacher, "k1").clamp(min=-10.0, max=10.0)
    a = mopd_advantage(teacher, student, mask)
    assert (a == -10.0).any()
    torch.testing.assert_close(a, -k1)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan")])
def test_mopd_advantage_bad_clip_raises(clip):
    with pytest.raises(ValueError, match="clip"):
        mopd_advantage(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), clip=clip)


def test_mopd_advantage_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        mopd_advantage(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_grpo_hand_values():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    a = grpo_outcome_advantage(scores, groups)
    s0 = math.sqrt(0.5)  # unbiased std of [1, 0]; group 1 tied, group 2 a singleton, group 3 tied
    expected = torch.tensor([0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(a, expected)
    assert a.dtype == torch.float32


def test_grpo_three_member_group_and_no_std():
    scores = torch.tensor([2.0, 0.0, 1.0])
    groups = ["p", "p", "p"]
    std = 1.0  # unbiased std of [2, 0, 1]
    torch.testing.assert_close(grpo_outcome_advantage(scores, groups),
                               torch.tensor([1.0, -1.0, 0.0]) / (std + 1e-6))
    torch.testing.assert_close(grpo_outcome_advantage(scores, groups, normalize_std=False),
                               torch.tensor([1.0, -1.0, 0.0]))


def test_grpo_singleton_and_tied_groups_are_exactly_zero():
    # 0.1 is not exactly representable: a naive (r - mean) / (std + eps) gives rounding noise / eps.
    scores = torch.tensor([0.1, 0.1, 0.1, 5.0])
    a = grpo_outcome_advantage(scores, torch.tensor([7, 7, 7, 9]))
    assert torch.equal(a, torch.zeros(4))


def test_grpo_string_ids_match_tensor_ids():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(12, generator=g)
    ids = torch.tensor([3, 3, 3, 1, 1, 1, 8, 8, 8, 0, 0, 0])
    names = [f"uid-{i}" for i in ids.tolist()]
    torch.testing.assert_close(grpo_outcome_advantage(scores, ids), grpo_outcome_advantage(scores, names))


def test_grpo_nan_score_excluded_from_group():
    scores = torch.tensor([1.0, 0.0, float("nan")])
    a = grpo_outcome_advantage(scores, [0, 0, 0])
    ref = grpo_outcome_advantage(scores[:2], [0, 0])
    torch.testing.assert_close(a[:2], ref)
    assert a[2] == 0.0


def test_grpo_empty_batch():
    assert grpo_outcome_advantage(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_grpo_agrees_with_verl():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                     reason="verl (test oracle) not importable in this venv")
    g = torch.Generator().manual_seed(1)
    B, T, n = 16, 5, 4
    scores = torch.randint(0, 3, (B,), generator=g).float() + 0.1 * torch.rand(B, generator=g)
    index = np.array([f"q{i // n}" for i in range(B)], dtype=object)
    mask = torch.ones(B, T)
    mask[::3, 3:] = 0
    rewards = torch.zeros(B, T)
    rewards[:, 0] = scores  # verl sums token rewards into the outcome score
    for norm in (True, False):
        adv_verl, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, epsilon=1e-6,
                                                                norm_adv_by_std_in_grpo=norm)
        ours = grpo_outcome_advantage(scores, list(index), normalize_std=norm)
        torch.testing.assert_close(adv_verl[:, 0], ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adv_verl, combine_advantages(torch.zeros(B, T), ours, 1.0, mask),
                                   rtol=1e-5, atol=1e-6)


def test_combine_advantages_broadcast_and_mask():
    a_mopd = torch.tensor([[0.5, -1.0, 7.0], [0.2, 0.3, 0.4]])
    a_orm = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = combine_advantages(a_mopd, a_orm, 0.5, mask)
    torch.testing.assert_close(out, torch.tensor([[1.5, 0.0, 0.0], [-0.3, -0.2, -0.1]]))


def test_combine_advantages_alpha_zero_is_pure_opd():
    a_mopd = torch.tensor([[0.5, -1.0]])
    mask = torch.tensor([[1, 0]])
    torch.testing.assert_close(combine_advantages(a_mopd, None, 0.0, mask), torch.tensor([[0.5, 0.0]]))
    with pytest.raises(ValueError, match="a_orm_B"):
        combine_advantages(a_mopd, None, 0.3, mask)
    with pytest.raises(ValueError):
        combine_advantages(a_mopd, torch.zeros(3), 0.3, mask)


def test_advantage_metrics():
    a = torch.tensor([[1.0, -2.0, 100.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    m = advantage_metrics(a, mask)
    assert m == pytest.approx({"mopd/advantage/mean": -0.5 / 3, "mopd/advantage/min": -2.0,
                               "mopd/advantage/max": 1.0})
    assert advantage_metrics(a, torch.zeros(2, 3)) == {"mopd/advantage/mean": 0.0, "mopd/advantage/min": 0.0,
                                                       "mopd/advantage/max": 0.0}


# --------------------------------------------------------------------------------------------------
# normalize_advantage: a baseline for the dense k1 advantage


def test_normalize_advantage_hand_values_and_mask():
    adv = torch.tensor([[-1.0, -3.0, 0.0], [-5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    c = normalize_advantage(adv, mask, "center")  # mean of -1, -3, -5 is -3
    torch.testing.assert_close(c, torch.tensor([[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0]]))
    w = normalize_advantage(adv, mask, "whiten")
    std = math.sqrt(8 / 3)
    torch.testing.assert_close(w, torch.tensor([[2 / std, 0.0, 0.0], [-2 / std, 0.0, 0.0]]), atol=1e-5, rtol=1e-5)
    assert normalize_advantage(adv, mask, "none") is adv
    # Valid tokens: mean 0 (and std 1 when whitened); masked positions exactly 0.
    g = torch.Generator().manual_seed(0)
    adv, mask = torch.randn(6, 9, generator=g) - 2.0, torch.rand(6, 9, generator=g) > 0.3
    for mode in ("center", "whiten"):
        out = normalize_advantage(adv * mask, mask, mode)
        assert out[mask].mean().abs() < 1e-5 and (out[~mask] == 0).all()
    assert normalize_advantage(adv * mask, mask, "whiten")[mask].std(unbiased=False).sub(1).abs() < 1e-4
    # Nothing valid: unchanged, no NaN.
    assert normalize_advantage(torch.zeros(2, 3), torch.zeros(2, 3), "whiten").eq(0).all()
    with pytest.raises(ValueError, match="center"):
        normalize_advantage(adv, mask, "zscore")


def test_advantage_norm_config_choice():
    from mopd.config import AdvantageNorm, ConfigError, load_config

    assert {m.value for m in AdvantageNorm} == set(ADVANTAGE_NORMS)
    assert load_config("configs/quickstart.yaml", ["algorithm.advantage_norm=center"]).algorithm.advantage_norm == "center"
    with pytest.raises(ConfigError, match="advantage_norm"):
        load_config("configs/quickstart.yaml", ["algorithm.advantage_norm=zscore"])


def test_centering_leaves_the_expected_policy_gradient_unchanged():
    """A constant baseline changes no expectation: E_y~pi[(A(y) - b) grad log pi(y)] = E[A grad log pi]. Exact
    over a whole small vocabulary (every token weighted by its probability)."""
    logits = torch.randn(16, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(16, dtype=torch.float64) - 3.0
    p = logits.softmax(-1).detach()

    def grad(a: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad((p * a * logits.log_softmax(-1)).sum(), logits)
        return g

    torch.testing.assert_close(grad(adv), grad(adv - 1.7))
