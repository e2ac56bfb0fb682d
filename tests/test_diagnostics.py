"""stability/diagnostics.py: mismatch metrics by hand and at the edges (verl agreement: test_metric_names.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.advantages import mopd_advantage
from stability.correction import correction_weights
from stability.diagnostics import EXTRA_METRIC_NAMES, MISMATCH_METRIC_NAMES, mismatch_metrics, teacher_kl

OOB = "rollout_corr/rollout_is_oob_ratio"
EXPECTED_NAMES = {
    "rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/chi2_token", "rollout_corr/chi2_seq",
    "rollout_corr/training_ppl", "rollout_corr/rollout_ppl", "rollout_corr/log_ppl_diff",
    "rollout_corr/log_ppl_abs_diff", "rollout_corr/ppl_ratio",
    "rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_std", "rollout_corr/rollout_is_max",
    "rollout_corr/rollout_is_min", "rollout_corr/rollout_is_eff_sample_size", OOB,
    "training/rollout_probs_diff_mean", "training/rollout_probs_diff_max", "rollout_corr/extreme_token_frac@2",
}
NO_BAND_NAMES = EXPECTED_NAMES - {OOB}

# Two sequences; (pi_old, mu) probabilities per token; the last token of seq 1 is padding.
P_OLD = [[0.75, 0.25, 0.25], [0.5, 0.2, 0.9]]
P_MU = [[0.25, 0.25, 0.75], [0.4, 0.5, 0.1]]
MASK = [[1, 1, 1], [1, 1, 0]]
LOW, HIGH = 0.5, 2.0


def _tensors():
    return torch.log(torch.tensor(P_OLD)), torch.log(torch.tensor(P_MU)), torch.tensor(MASK)


def _hand_metrics() -> dict[str, float]:
    """The definitions written out with Python floats, token by token (raw ratios as IS weights)."""
    toks, seqs = [], []
    for po_row, pm_row, m_row in zip(P_OLD, P_MU, MASK, strict=True):
        seq = [(po, pm) for po, pm, m in zip(po_row, pm_row, m_row, strict=True) if m]
        toks += seq
        seqs.append(seq)
    ks = [po / pm for po, pm in toks]
    n = len(toks)
    mean_old = [sum(math.log(po) for po, _ in s) / len(s) for s in seqs]
    mean_mu = [sum(math.log(pm) for _, pm in s) / len(s) for s in seqs]
    lpd = [m - o for m, o in zip(mean_mu, mean_old, strict=True)]
    seq_k = [math.prod(po / pm for po, pm in s) for s in seqs]
    diffs = [abs(po - pm) for po, pm in toks]
    w_mean = sum(ks) / n
    w_sq = sum(k * k for k in ks) / n
    return {
        "rollout_corr/kl": sum(math.log(pm) - math.log(po) for po, pm in toks) / n,
        "rollout_corr/k3_kl": sum(k - math.log(k) - 1 for k in ks) / n,
        "rollout_corr/chi2_token": w_sq - 1,
        "rollout_corr/chi2_seq": sum(k * k for k in seq_k) / len(seq_k) - 1,
        "rollout_corr/training_ppl": sum(math.exp(-x) for x in mean_old) / len(seqs),
        "rollout_corr/rollout_ppl": sum(math.exp(-x) for x in mean_mu) / len(seqs),
        "rollout_corr/log_ppl_diff": sum(lpd) / len(lpd),
        "rollout_corr/log_ppl_abs_diff": sum(abs(x) for x in lpd) / len(lpd),
        "rollout_corr/ppl_ratio": sum(math.exp(x) for x in lpd) / len(lpd),
        "rollout_corr/rollout_is_mean": w_mean,
        "rollout_corr/rollout_is_std": math.sqrt(w_sq - w_mean**2),
        "rollout_corr/rollout_is_max": max(ks),
        "rollout_corr/rollout_is_min": min(ks),
        "rollout_corr/rollout_is_eff_sample_size": w_mean**2 / w_sq,
        OOB: sum(not LOW <= k <= HIGH for k in ks) / n,
        "training/rollout_probs_diff_mean": sum(diffs) / n,
        "training/rollout_probs_diff_max": max(diffs),
        "rollout_corr/extreme_token_frac@2": sum(max(k, 1 / k) > 2 for k in ks) / n,
    }


def test_exact_metric_names():
    assert set(MISMATCH_METRIC_NAMES) == EXPECTED_NAMES and len(MISMATCH_METRIC_NAMES) == len(EXPECTED_NAMES)
    assert set(EXTRA_METRIC_NAMES) <= EXPECTED_NAMES
    assert set(mismatch_metrics(*_tensors())) == NO_BAND_NAMES  # no band, no out-of-band ratio
    assert set(mismatch_metrics(*_tensors(), low=LOW, high=HIGH)) == EXPECTED_NAMES


def test_hand_computed_values():
    got = mismatch_metrics(*_tensors(), low=LOW, high=HIGH)
    want = _hand_metrics()
    # k = 3, 1, 1/3 | 1.25, 0.4: three tokens beyond a factor 2, three outside [0.5, 2]
    assert want["rollout_corr/extreme_token_frac@2"] == pytest.approx(3 / 5)
    assert want[OOB] == pytest.approx(3 / 5)
    for name in EXPECTED_NAMES:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
        assert isinstance(got[name], float)


def test_oob_ratio_is_icepop_masked_fraction():
    old, mu, mask = _tensors()
    w, corr = correction_weights("icepop", old, mu, mask, low=0.5, high=2.5)
    m = mismatch_metrics(old, mu, mask, w, low=0.5, high=2.5)
    assert m[OOB] == pytest.approx(corr["icepop/masked_frac"]) == pytest.approx(3 / 5)  # k = 3, 1/3, 0.4
    # inclusive band: k exactly on an edge is inside
    assert mismatch_metrics(old, mu, mask, low=1 / 3 - 1e-6, high=3 + 1e-5)[OOB] == 0.0


def test_band_arguments_checked():
    with pytest.raises(ValueError, match="both"):
        mismatch_metrics(*_tensors(), low=0.5)
    with pytest.raises(ValueError, match="low <= high"):
        mismatch_metrics(*_tensors(), low=2.0, high=1.0)


def test_identical_policies_are_ideal():
    old, _, mask = _tensors()
    m = mismatch_metrics(old, old.clone(), mask, low=LOW, high=HIGH)
    for name in ("rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/chi2_token", "rollout_corr/chi2_seq",
                 "rollout_corr/log_ppl_diff", "rollout_corr/log_ppl_abs_diff", "rollout_corr/rollout_is_std", OOB,
                 "training/rollout_probs_diff_mean", "training/rollout_probs_diff_max",
                 "rollout_corr/extreme_token_frac@2"):
        assert m[name] == pytest.approx(0.0, abs=1e-6), name
    for name in ("rollout_corr/ppl_ratio", "rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_max",
                 "rollout_corr/rollout_is_min", "rollout_corr/rollout_is_eff_sample_size"):
        assert m[name] == pytest.approx(1.0, abs=1e-6), name
    assert m["rollout_corr/training_ppl"] == pytest.approx(m["rollout_corr/rollout_ppl"])


def test_ess_range_and_applied_weights():
    old, mu, mask = _tensors()
    m = mismatch_metrics(old, mu, mask)
    assert 0 < m["rollout_corr/rollout_is_eff_sample_size"] < 1
    # Applied weights: IcePop zeros some tokens, ESS then counts them.
    w, _ = correction_weights("icepop", old, mu, mask, low=0.5, high=2.0)
    m_w = mismatch_metrics(old, mu, mask, weights_BT=w)
    kept = w[mask.bool()]
    assert m_w["rollout_corr/rollout_is_mean"] == pytest.approx(kept.mean().item())
    assert m_w["rollout_corr/rollout_is_min"] == 0.0
    assert m_w["rollout_corr/rollout_is_max"] == pytest.approx(1.25)
    assert m_w["rollout_corr/rollout_is_std"] == pytest.approx(kept.std(correction=0).item())
    assert m_w["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(
        kept.mean().item() ** 2 / kept.square().mean().item())
    for name in NO_BAND_NAMES:  # weights only touch rollout_is_*
        if "rollout_is_" not in name:
            assert m_w[name] == m[name], name
    m0 = mismatch_metrics(old, mu, mask, weights_BT=torch.zeros_like(old))
    assert m0["rollout_corr/rollout_is_eff_sample_size"] == 0.0 and m0["rollout_corr/rollout_is_mean"] == 0.0
    with pytest.raises(ValueError, match="weights_BT shape"):
        mismatch_metrics(old, mu, mask, weights_BT=torch.ones(2, 2))


def test_single_token_std_is_zero():
    m = mismatch_metrics(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -2.0]]), torch.tensor([[1, 0]]))
    assert m["rollout_corr/rollout_is_std"] == 0.0
    assert m["rollout_corr/rollout_is_max"] == m["rollout_corr/rollout_is_min"] == pytest.approx(math.e)


def test_empty_mask_gives_zeros():
    old, mu, _ = _tensors()
    assert mismatch_metrics(old, mu, torch.zeros(2, 3)) == dict.fromkeys(NO_BAND_NAMES, 0.0)
    assert mismatch_metrics(old, mu, torch.zeros(2, 3), low=LOW, high=HIGH) == dict.fromkeys(EXPECTED_NAMES, 0.0)


def test_nonfinite_tokens_and_empty_sequences_are_left_out():
    old, mu, mask = _tensors()
    ref = mismatch_metrics(old, mu, mask, low=LOW, high=HIGH)
    # Add a NaN token and a fully padded third sequence: nothing may change.
    old2 = torch.cat([old, torch.full((1, 3), -1.0)])
    mu2 = torch.cat([mu, torch.full((1, 3), -1.0)])
    mask2 = torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)])
    mask2[1, 2] = 1
    old2[1, 2] = float("nan")
    got = mismatch_metrics(old2, mu2, mask2, low=LOW, high=HIGH)
    for name in EXPECTED_NAMES:
        assert got[name] == pytest.approx(ref[name], rel=1e-6, abs=1e-7), name


def test_extreme_ratios_stay_finite():
    old = torch.tensor([[0.0, -300.0, -1.0]])
    mu = torch.tensor([[-300.0, 0.0, -1.0]])
    m = mismatch_metrics(old, mu, torch.ones(1, 3), low=LOW, high=HIGH)
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["rollout_corr/rollout_is_max"] == pytest.approx(math.exp(20.0), rel=1e-5)  # log k clamped at 20
    assert m["rollout_corr/training_ppl"] == pytest.approx(math.exp(301 / 3), rel=1e-4)  # no float32 overflow


def test_teacher_kl_hand_and_edges():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, float("nan"), -3.0]])
    teacher = torch.tensor([[-1.5, -1.0, -9.0], [-0.4, -0.2, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert teacher_kl(student, teacher, mask) == pytest.approx((0.5 - 1.0 + 0.3) / 3)
    assert teacher_kl(student, teacher, torch.zeros(2, 3)) == 0.0
    # teacher KL is minus the mean unclipped dense advantage
    adv = mopd_advantage(teacher, student, mask, clip=None)
    ok = mask.bool() & torch.isfinite(student)
    assert teacher_kl(student, teacher, mask) == pytest.approx(-adv[ok].mean().item())


def test_teacher_kl_is_never_clipped():
    student = torch.tensor([[-1.0, -1.0]])
    teacher = torch.tensor([[-31.0, -1.0]])  # a token the teacher finds near-impossible
    mask = torch.ones(1, 2)
    assert teacher_kl(student, teacher, mask) == pytest.approx(15.0)
    assert mopd_advantage(teacher, student, mask).min().item() == pytest.approx(-10.0)  # the advantage is


def _random_batch(seed: int, B: int = 8, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    mu = torch.log_softmax(torch.randn(B, T, 5, generator=g), -1)[..., 0]
    old = mu + 0.5 * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return old, mu, mask


def test_teacher_kl_agrees_with_verl_k1():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                     reason="verl (test oracle) not importable in this venv")
    student, teacher, mask = _random_batch(6)
    k1 = core_algos.kl_penalty(student, teacher, "k1")
    assert teacher_kl(student, teacher, mask) == pytest.approx(((k1 * mask).sum() / mask.sum()).item(), rel=1e-5)
