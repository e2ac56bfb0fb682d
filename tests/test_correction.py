"""stability/correction.py: IcePop / TIS / sequence masking, by hand, at the edges, and against verl."""

from __future__ import annotations

import math

import pytest
import torch

from stability.correction import (
    correction_weights,
    icepop_weights,
    sequence_mask_weights,
    tis_weights,
    zero_weight_fraction,
)


def _pair(k_values: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(old, rollout) log-probs whose ratio per token is the given k."""
    k = torch.tensor(k_values, dtype=torch.float32)
    rollout = torch.full_like(k, -2.0)
    return rollout + torch.log(k), rollout


def _verl_rc():
    return pytest.importorskip("verl.trainer.ppo.rollout_corr_helper",
                               reason="verl (test oracle) not importable in this venv")


def _random_batch(seed: int, B: int = 6, T: int = 9, scale: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(B, T, generator=g) * 3
    old = rollout + scale * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return old, rollout, mask


def test_icepop_hand_values_band_inclusive():
    old, mu = _pair([[0.3, 1.0, 2.0, 6.0, 4.9, 0.51, 0.49]])
    w = icepop_weights(old, mu, torch.ones_like(old), low=0.5, high=5.0)
    expected = torch.tensor([[0.0, 1.0, 2.0, 0.0, 4.9, 0.51, 0.0]])
    torch.testing.assert_close(w, expected)
    outside = expected == 0
    assert torch.all(w[outside] == 0.0)  # exactly zero, not small


def test_icepop_band_edges_are_inclusive():
    old, mu = _pair([[4.99, 0.501, 5.01, 0.499]])
    w = icepop_weights(old, mu, torch.ones_like(old), low=0.5, high=5.0)
    torch.testing.assert_close(w, torch.tensor([[4.99, 0.501, 0.0, 0.0]]))
    # k == 1 exactly (old == mu) sits on both edges of the degenerate band [1, 1]
    same = torch.tensor([[-1.3, -0.2]])
    torch.testing.assert_close(icepop_weights(same, same.clone(), torch.ones(1, 2), low=1.0, high=1.0),
                               torch.ones(1, 2))


def test_icepop_equals_k_inside_band():
    old, mu, mask = _random_batch(3, scale=0.5)
    w = icepop_weights(old, mu, mask)
    k = torch.exp(old - mu)
    inside = mask.bool() & (k >= 0.5) & (k <= 5.0)
    assert inside.any() and (mask.bool() & ~inside).any()
    torch.testing.assert_close(w[inside], k[inside])
    assert torch.all(w[~inside] == 0.0)


def test_weights_are_detached_and_masked():
    old, mu = _pair([[1.5, 1.0, 3.0]])
    old = old.clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 0]])
    for w in (icepop_weights(old, mu, mask), tis_weights(old, mu, mask), sequence_mask_weights(old, mu, mask)):
        assert not w.requires_grad
        assert w[0, 2] == 0.0
        assert w[0, 0] != 0.0


def test_tis_hand_values():
    old, mu = _pair([[0.3, 1.0, 3.0, 2.0]])
    w = tis_weights(old, mu, torch.tensor([[1, 1, 1, 0]]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.3, 1.0, 2.0, 0.0]]))


def test_extreme_log_ratios_do_not_overflow():
    old = torch.tensor([[0.0, -1000.0, -1.0]])
    mu = torch.tensor([[-1000.0, 0.0, -1.0]])
    mask = torch.ones(1, 3)
    w_ice = icepop_weights(old, mu, mask)
    w_tis = tis_weights(old, mu, mask, cap=2.0)
    assert torch.isfinite(w_ice).all() and torch.isfinite(w_tis).all()
    torch.testing.assert_close(w_ice, torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(w_tis, torch.tensor([[2.0, math.exp(-20.0), 1.0]]))


def test_sequence_mask_hand_values():
    # seq 0: geo-mean 4 -> kept; seq 1: geo-mean 8 -> dropped;
    # seq 2: tokens 10 and 0.1 are each out of band but their geo-mean is 1 -> kept; seq 3: empty.
    old, mu = _pair([[4.0, 4.0], [8.0, 8.0], [10.0, 0.1], [1.0, 1.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 0]])
    w = sequence_mask_weights(old, mu, mask, low=0.5, high=5.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    # same batch, token-level IcePop drops both tokens of seq 2
    assert torch.all(icepop_weights(old, mu, mask)[2] == 0)


def test_sequence_mask_ignores_padding_in_geo_mean():
    old, mu = _pair([[4.0, 1000.0]])
    w = sequence_mask_weights(old, mu, torch.tensor([[1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0]]))


def test_nonfinite_inputs_masked_and_counted():
    nan = float("nan")
    old = torch.tensor([[nan, -1.0, -1.0, nan], [-1.0, float("inf"), -1.0, -1.0]])
    mu = torch.tensor([[-1.0, -1.0, -1.2, -1.0], [-1.0, -1.0, nan, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    for mode in ("icepop", "tis", "seq_mask"):
        w, m = correction_weights(mode, old, mu, mask)
        assert torch.isfinite(w).all()
        assert w[0, 0] == 0 and w[1, 1] == 0 and w[1, 2] == 0 and w[0, 3] == 0
        assert w[0, 1] > 0 and w[1, 0] > 0
        assert m["correction/nonfinite_frac"] == pytest.approx(3 / 7)
        assert m["icepop/masked_frac"] == pytest.approx(3 / 7)


def test_dispatcher_modes_and_metrics():
    old, mu = _pair([[0.3, 1.0, 2.0, 6.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    w, m = correction_weights("icepop", old, mu, mask, low=0.5, high=5.0)
    torch.testing.assert_close(w, icepop_weights(old, mu, mask))
    assert m["icepop/masked_frac"] == pytest.approx(2 / 6)
    assert m["correction/weight_mean"] == pytest.approx((1 + 2 + 1 + 1) / 6)
    w, m = correction_weights("tis", old, mu, mask, cap=1.5)
    torch.testing.assert_close(w, tis_weights(old, mu, mask, cap=1.5))
    assert m["icepop/masked_frac"] == 0.0
    w, m = correction_weights("seq_mask", old, mu, mask, low=0.9, high=1.1)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0, 0, 0], [1, 1, 0, 0]]))
    assert m["icepop/masked_frac"] == pytest.approx(4 / 6)
    w, m = correction_weights("none", old, None, mask)
    torch.testing.assert_close(w, mask.float())
    assert m == {"icepop/masked_frac": 0.0, "correction/nonfinite_frac": 0.0, "correction/weight_mean": 1.0}


def test_dispatcher_errors():
    old, mu = _pair([[1.0]])
    with pytest.raises(ValueError, match="allowed"):
        correction_weights("clip", old, mu, torch.ones(1, 1))
    with pytest.raises(ValueError, match="mu"):
        correction_weights("icepop", old, None, torch.ones(1, 1))
    with pytest.raises(ValueError):
        icepop_weights(old, mu, torch.ones(1, 1), low=2.0, high=1.0)


def test_all_masked_batch():
    old, mu = _pair([[3.0, 0.1]])
    mask = torch.zeros(1, 2)
    for mode in ("none", "icepop", "tis", "seq_mask"):
        w, m = correction_weights(mode, old, mu, mask)
        assert torch.equal(w, torch.zeros(1, 2))
        assert m["icepop/masked_frac"] == 0.0
    assert zero_weight_fraction(torch.zeros(1, 2), mask) == 0.0


def test_icepop_agrees_with_verl():
    rc = _verl_rc()
    old, mu, mask = _random_batch(11)
    w_verl, m_verl = rc.compute_rollout_correction_weights(old - mu, mask, rollout_is="token",
                                                           rollout_is_threshold="0.5_5.0")
    w, m = correction_weights("icepop", old, mu, mask, low=0.5, high=5.0)
    assert 0 < m["icepop/masked_frac"] < 1
    torch.testing.assert_close(w, w_verl)
    assert m["icepop/masked_frac"] == pytest.approx(m_verl["rollout_is_oob_ratio"], abs=1e-6)


def test_tis_agrees_with_verl():
    rc = _verl_rc()
    old, mu, mask = _random_batch(12)
    w_verl, _ = rc.compute_rollout_correction_weights(old - mu, mask, rollout_is="token", rollout_is_threshold=2.0)
    torch.testing.assert_close(tis_weights(old, mu, mask, cap=2.0), w_verl)


def _verl_seq_mean_k1(rc, old, mu, mask, spec: str) -> torch.Tensor:
    kept, _ = rc.compute_rollout_rejection_mask(old - mu, mask, rollout_rs="seq_mean_k1", rollout_rs_threshold=spec)
    return kept.float()


def test_sequence_mask_agrees_with_verl_only_with_the_band_inverted():
    """The docstring's claim: seq_mask [low, high] == verl seq_mean_k1 with threshold "1/high_1/low"
    (verl's k1 is -log k), and with the same string only for a band symmetric in log space."""
    rc = _verl_rc()
    old, mu, mask = _random_batch(13, B=64, scale=0.6)
    low, high = 0.7, 1.6  # asymmetric: low * high != 1
    w = sequence_mask_weights(old, mu, mask, low=low, high=high)
    assert 0 < w.sum() < mask.sum()  # the test exercises both outcomes
    torch.testing.assert_close(w, _verl_seq_mean_k1(rc, old, mu, mask, f"{1 / high}_{1 / low}"))
    assert not torch.equal(w, _verl_seq_mean_k1(rc, old, mu, mask, f"{low}_{high}"))  # not inverted: differs
    sym = sequence_mask_weights(old, mu, mask, low=0.8, high=1.25)  # symmetric band: both spellings agree
    torch.testing.assert_close(sym, _verl_seq_mean_k1(rc, old, mu, mask, "0.8_1.25"))
