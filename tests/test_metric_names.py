"""Metric names and values against verl's own functions (verl 0.9.1 is the oracle).

Every name ``stability.diagnostics.mismatch_metrics`` emits that verl also computes must be spelled as
verl spells it and carry verl's value; the names verl does not have must be exactly the documented
extras (``EXTRA_METRIC_NAMES``). verl's functions: ``compute_rollout_correction_and_rejection_mask``
(the ``rollout_corr/*`` family: off-policy metrics and token-level IS metrics), and
``calculate_debug_metrics`` (``training/rollout_probs_diff_*``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from stability.correction import correction_weights
from stability.diagnostics import EXTRA_METRIC_NAMES, MISMATCH_METRIC_NAMES, mismatch_metrics

rc = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper", reason="verl (test oracle) not importable")
debug = pytest.importorskip("verl.utils.debug.metrics", reason="verl (test oracle) not importable")
from verl.protocol import DataProto  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _batch(seed: int, B: int = 8, T: int = 12, scale: float = 0.7):
    """Random (pi_old, mu, mask) without verl's edge cases: every sequence has >= 1 valid token, all finite,
    |log k| far below verl's clamp of 20."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.log_softmax(torch.randn(B, T, 6, generator=g), -1)[..., 0]
    old = mu + scale * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return old, mu, mask


def _verl(old, mu, mask, threshold) -> dict[str, float]:
    """Everything verl logs for this batch: rollout_corr/* (token-level IS with `threshold`) + training/*."""
    _, _, m = rc.compute_rollout_correction_and_rejection_mask(
        old, mu, mask, rollout_is="token", rollout_is_threshold=threshold)
    data = DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": mu, "response_mask": mask,
                                        "responses": torch.zeros_like(mask, dtype=torch.long)})
    return {**m, **debug.calculate_debug_metrics(data)}


def _assert_agree(ours: dict[str, float], theirs: dict[str, float]) -> None:
    shared = set(ours) & set(theirs)
    assert shared == set(ours) - set(EXTRA_METRIC_NAMES), sorted(set(ours) - shared)
    assert set(ours) - set(theirs) == set(EXTRA_METRIC_NAMES)
    for name in sorted(shared):
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_icepop_names_and_values_equal_verl(seed):
    low, high = 0.5, 2.0
    old, mu, mask = _batch(seed)
    w, corr = correction_weights("icepop", old, mu, mask, low=low, high=high)
    ours = mismatch_metrics(old, mu, mask, w, low=low, high=high)
    theirs = _verl(old, mu, mask, f"{low}_{high}")
    assert set(ours) == set(MISMATCH_METRIC_NAMES)
    assert 0.05 < ours["rollout_corr/rollout_is_oob_ratio"] < 0.95  # the band really acts
    _assert_agree(ours, theirs)
    assert corr["icepop/masked_frac"] == pytest.approx(theirs["rollout_corr/rollout_is_oob_ratio"])


def test_tis_names_and_values_equal_verl():
    cap = 1.5
    old, mu, mask = _batch(3)
    w, _ = correction_weights("tis", old, mu, mask, cap=cap)
    ours = mismatch_metrics(old, mu, mask, w)  # verl has no out-of-band ratio for TIS: neither do we without a band
    assert ours["rollout_corr/rollout_is_max"] == pytest.approx(cap)
    _assert_agree(ours, _verl(old, mu, mask, cap))


def test_raw_ratios_equal_verl_without_truncation():
    """No weights given: rollout_is_* describe k itself, which is verl's with a cap above every ratio."""
    old, mu, mask = _batch(4)
    ours = mismatch_metrics(old, mu, mask)
    assert ours["rollout_corr/rollout_is_max"] < 1e6
    _assert_agree(ours, _verl(old, mu, mask, 1e6))


def test_actor_side_offpolicy_metrics_equal_verl():
    """verl's actor logs the off-policy family again from the current policy's log-probs."""
    old, mu, mask = _batch(5)
    theirs = rc.compute_rollout_corr_metrics_from_logprobs(old, mu, mask)
    ours = mismatch_metrics(old, mu, mask)
    shared = set(ours) & set(theirs)
    assert {"rollout_corr/kl", "rollout_corr/chi2_seq", "rollout_corr/training_ppl"} <= shared
    for name in shared:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name


def test_edges_equal_verl_on_the_batch_without_them():
    """Our edge handling: an all-padding sequence and a NaN token are left out. That equals verl on the
    batch with that row removed and that token masked (verl itself would average the empty row in)."""
    low, high = 0.5, 2.0
    old, mu, mask = _batch(6)
    r = int((mask.sum(-1) >= 2).nonzero()[0])  # a row that keeps a valid token after losing one
    clean_mask = mask.clone()
    clean_mask[r, 0] = 0  # the token that will hold a NaN
    theirs = _verl(old, mu, clean_mask, f"{low}_{high}")

    old_e = torch.cat([old, torch.full((1, old.shape[1]), -1.0)])
    mu_e = torch.cat([mu, torch.full((1, old.shape[1]), -3.0)])
    mask_e = torch.cat([mask, torch.zeros(1, old.shape[1])])
    old_e[r, 0] = float("nan")
    w, _ = correction_weights("icepop", old_e, mu_e, mask_e, low=low, high=high)
    ours = mismatch_metrics(old_e, mu_e, mask_e, w, low=low, high=high)
    _assert_agree(ours, theirs)


def test_extras_are_documented_and_not_verl():
    old, mu, mask = _batch(7)
    theirs = _verl(old, mu, mask, "0.5_5.0")
    assert EXTRA_METRIC_NAMES == ("rollout_corr/extreme_token_frac@2",)
    assert not set(EXTRA_METRIC_NAMES) & set(theirs)
    import stability.diagnostics as diag

    documented = set()  # names in the module docstring, with ``a/{b,c}`` expanded
    for head, alts, tail in re.findall(r"``([\w/@.]+?)(?:\{([\w,]+)\})?([\w/@.]*)``", diag.__doc__):
        documented |= {head + a + tail for a in alts.split(",")} if alts else {head + tail}
    assert set(MISMATCH_METRIC_NAMES) <= documented, sorted(set(MISMATCH_METRIC_NAMES) - documented)


def test_default_gates_use_emitted_names():
    rules = yaml.safe_load((REPO / "configs/gates/default.yaml").read_text())
    assert {"rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_eff_sample_size", "rollout_corr/kl"} <= set(rules)
    for name in rules:
        if name.startswith(("rollout_corr/", "training/", "is/")):
            assert name in MISMATCH_METRIC_NAMES, name
    assert "actor/pg_loss" not in rules and "actor/loss" in rules  # trained whatever the objective
