"""A wall-clock schedule horizon: the LR schedule follows the fraction of the time budget used, so an
equal-time comparison completes every run's warm-up and decay whatever its step count."""

from __future__ import annotations

import math

import pytest
from test_trainer import cfg_for, make_samples, models  # noqa: F401 - the module-scoped fixture

from mopd.batch import build_batch
from mopd.config import ConfigError, load_config
from mopd.trainer import Trainer


def test_progress_sets_the_cosine_schedule_position(models):  # noqa: F811
    tok, d = models
    cfg = cfg_for(d, "trainer.lr_schedule=cosine", "trainer.steps=10", "trainer.lr_min_ratio=0.1",
                  "trainer.schedule_horizon=wallclock", "trainer.max_wallclock_s=60")
    tr = Trainer(cfg, str(d / "student"))
    batch = build_batch(make_samples(tok, d / "teacher", n=4), tok.pad_token_id)
    lr = cfg.trainer.lr
    for progress in (0.5, 0.2, 1.0, 3.0):  # any order, clamped to [0, 1]: position comes from time, not calls
        got = tr.step(batch, progress)["actor/lr"]
        p = min(progress, 1.0)
        want = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * round(p * 10) / 10)))
        assert got == pytest.approx(want, rel=1e-6), progress


def test_steps_horizon_counts_steps(models):  # noqa: F811
    tok, d = models
    cfg = cfg_for(d, "trainer.lr_schedule=linear", "trainer.steps=4", "trainer.lr_min_ratio=0.0")
    tr = Trainer(cfg, str(d / "student"))
    batch = build_batch(make_samples(tok, d / "teacher", n=4), tok.pad_token_id)
    lrs = [tr.step(batch)["actor/lr"] for _ in range(4)]
    assert lrs == pytest.approx([cfg.trainer.lr * f for f in (0.75, 0.5, 0.25, 0.0)], abs=1e-12)


def test_wallclock_horizon_needs_a_budget():
    with pytest.raises(ConfigError, match="max_wallclock_s > 0"):
        load_config("configs/quickstart.yaml", ["trainer.schedule_horizon=wallclock", "trainer.max_wallclock_s=0"])
