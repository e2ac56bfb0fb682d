"""stability/diagnostics.py: mismatch metrics by hand, at the edges, and against verl's definitions."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.advantages import mopd_advantage
from stability.correction import correction_weights
from stability.diagnostics import MISMATCH_METRIC_NAMES, mismatch_metrics, teacher_kl

EXPECTED_NAMES = {
    "rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/chi2_token", "rollout_corr/log_ppl_diff",
    "rollout_corr/ppl_ratio", "rollout_corr/probs_diff_mean", "rollout_corr/probs_diff_max",
    "rollout_corr/extreme_token_frac@2", "is/mean", "is/eff_sample_size",
}

# Two sequences; (pi_old, mu) probabilities per token; the last token of seq 1 is padding.
P_OLD = [[0.75, 0.25, 0.25], [0.5, 0.2, 0.9]]
P_MU = [[0.25, 0.25, 0.75], [0.4, 0.5, 0.1]]
MASK = [[1, 1, 1], [1, 1, 0]]


def _tensors():
    return torch.log(torch.tensor(P_OLD)), torch.log(torch.tensor(P_MU)), torch.tensor(MASK)


def _hand_metrics() -> dict[str, float]:
    """The definitions written out with Python floats, token by token."""
    toks, seqs = [], []
    for po_row, pm_row, m_row in zip(P_OLD, P_MU, MASK, strict=True):
        seq = [(po, pm) for po, pm, m in zip(po_row, pm_row, m_row, strict=True) if m]
        toks += seq
        seqs.append(seq)
    ks = [po / pm for po, pm in toks]
    n = len(toks)
    lpd = [sum(math.log(pm) - math.log(po) for po, pm in s) / len(s) for s in seqs]
    diffs = [abs(po - pm) for po, pm in toks]
    w_mean = sum(ks) / n
    return {
        "rollout_corr/kl": sum(math.log(pm) - math.log(po) for po, pm in toks) / n,
        "rollout_corr/k3_kl": sum(k - math.log(k) - 1 for k in ks) / n,
        "rollout_corr/chi2_token": sum(k * k for k in ks) / n - 1,
        "rollout_corr/log_ppl_diff": sum(lpd) / len(lpd),
        "rollout_corr/ppl_ratio": sum(math.exp(x) for x in lpd) / len(lpd),
        "rollout_corr/probs_diff_mean": sum(diffs) / n,
        "rollout_corr/probs_diff_max": max(diffs),
        "rollout_corr/extreme_token_frac@2": sum(max(k, 1 / k) > 2 for k in ks) / n,
        "is/mean": w_mean,
        "is/eff_sample_size": w_mean**2 / (sum(k * k for k in ks) / n),
    }


def test_exact_metric_names():
    assert set(MISMATCH_METRIC_NAMES) == EXPECTED_NAMES
    assert set(mismatch_metrics(*_tensors())) == EXPECTED_NAMES


def test_hand_computed_values():
    got = mismatch_metrics(*_tensors())
    want = _hand_metrics()
    assert want["rollout_corr/extreme_token_frac@2"] == pytest.approx(3 / 5)  # k = 3, 1/3, 0.1 (and 1.25, 0.4)
    for name in EXPECTED_NAMES:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
        assert isinstance(got[name], float)


def test_identical_policies_are_ideal():
    old, _, mask = _tensors()
    m = mismatch_metrics(old, old.clone(), mask)
    for name in ("rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/chi2_token", "rollout_corr/log_ppl_diff",
                 "rollout_corr/probs_diff_mean", "rollout_corr/probs_diff_max",
                 "rollout_corr/extreme_token_frac@2"):
        assert m[name] == pytest.approx(0.0, abs=1e-6), name
    for name in ("rollout_corr/ppl_ratio", "is/mean", "is/eff_sample_size"):
        assert m[name] == pytest.approx(1.0, abs=1e-6), name


def test_ess_range_and_applied_weights():
    old, mu, mask = _tensors()
    m = mismatch_metrics(old, mu, mask)
    assert 0 < m["is/eff_sample_size"] < 1
    # Applied weights: IcePop zeros some tokens, ESS then counts them.
    w, _ = correction_weights("icepop", old, mu, mask, low=0.5, high=2.0)
    m_w = mismatch_metrics(old, mu, mask, weights_BT=w)
    kept = w[mask.bool()]
    assert m_w["is/mean"] == pytest.approx(kept.mean().item())
    assert m_w["is/eff_sample_size"] == pytest.approx(kept.mean().item() ** 2 / kept.square().mean().item())
    assert m_w["rollout_corr/kl"] == m["rollout_corr/kl"]  # weights only touch is/*
    m0 = mismatch_metrics(old, mu, mask, weights_BT=torch.zeros_like(old))
    assert m0["is/eff_sample_size"] == 0.0 and m0["is/mean"] == 0.0


def test_empty_mask_gives_zeros():
    old, mu, _ = _tensors()
    m = mismatch_metrics(old, mu, torch.zeros(2, 3))
    assert m == dict.fromkeys(EXPECTED_NAMES, 0.0)


def test_nonfinite_tokens_and_empty_sequences_are_left_out():
    old, mu, mask = _tensors()
    ref = mismatch_metrics(old, mu, mask)
    # Add a NaN token and a fully padded third sequence: nothing may change.
    old2 = torch.cat([old, torch.full((1, 3), -1.0)])
    mu2 = torch.cat([mu, torch.full((1, 3), -1.0)])
    mask2 = torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)])
    mask2[1, 2] = 1
    old2[1, 2] = float("nan")
    got = mismatch_metrics(old2, mu2, mask2)
    for name in EXPECTED_NAMES:
        assert got[name] == pytest.approx(ref[name], rel=1e-6, abs=1e-7), name


def test_teacher_kl_hand_and_edges():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, float("nan"), -3.0]])
    teacher = torch.tensor([[-1.5, -1.0, -9.0], [-0.4, -0.2, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert teacher_kl(student, teacher, mask) == pytest.approx((0.5 - 1.0 + 0.3) / 3)
    assert teacher_kl(student, teacher, torch.zeros(2, 3)) == 0.0
    # teacher KL is minus the mean dense advantage
    adv = mopd_advantage(teacher, student, mask)
    ok = mask.bool() & torch.isfinite(student)
    assert teacher_kl(student, teacher, mask) == pytest.approx(-adv[ok].mean().item())


def _random_batch(seed: int, B: int = 8, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    mu = torch.log_softmax(torch.randn(B, T, 5, generator=g), -1)[..., 0]
    old = mu + 0.5 * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return old, mu, mask


def test_agrees_with_verl_offpolicy_and_is_metrics():
    rc = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper",
                             reason="verl (test oracle) not importable in this venv")
    debug = pytest.importorskip("verl.utils.debug.metrics", reason="verl (test oracle) not importable")
    old, mu, mask = _random_batch(5)
    ours = mismatch_metrics(old, mu, mask)
    ref = rc.compute_offpolicy_metrics(old, mu, mask)
    for key in ("kl", "k3_kl", "chi2_token", "log_ppl_diff", "ppl_ratio"):
        assert ours[f"rollout_corr/{key}"] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    diff = debug.calculate_log_prob_diff(old.exp(), mu.exp(), mask.bool())
    assert ours["rollout_corr/probs_diff_mean"] == pytest.approx(diff.mean().item(), rel=1e-5)
    assert ours["rollout_corr/probs_diff_max"] == pytest.approx(diff.max().item(), rel=1e-5)
    for mode, spec in (("tis", 2.0), ("icepop", "0.5_5.0")):
        w, _ = correction_weights(mode, old, mu, mask, low=0.5, high=5.0, cap=2.0)
        _, m_verl = rc.compute_rollout_correction_weights(old - mu, mask, rollout_is="token", rollout_is_threshold=spec)
        got = mismatch_metrics(old, mu, mask, weights_BT=w)
        assert got["is/mean"] == pytest.approx(m_verl["rollout_is_mean"], rel=1e-5), mode
        assert got["is/eff_sample_size"] == pytest.approx(m_verl["rollout_is_eff_sample_size"], rel=1e-5), mode


def test_teacher_kl_agrees_with_verl_k1():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                     reason="verl (test oracle) not importable in this venv")
    student, teacher, mask = _random_batch(6)
    k1 = core_algos.kl_penalty(student, teacher, "k1")
    assert teacher_kl(student, teacher, mask) == pytest.approx(((k1 * mask).sum() / mask.sum()).item(), rel=1e-5)
