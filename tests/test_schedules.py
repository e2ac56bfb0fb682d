"""`trainer.lr_schedule`: warm-up, then constant / cosine / linear down to lr * lr_min_ratio."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.config import ConfigError, TrainerConfig
from mopd.schedules import make_lr_scheduler

LR = 0.1


def lrs(schedule: str, steps: int, warmup: int = 0, ratio: float = 0.0, total: int | None = None,
        run: int | None = None) -> list[float]:
    """The lr at scheduler positions 0..run (default: 0..total), as the optimizer sees it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    cfg = TrainerConfig(steps=steps, lr=LR, lr_schedule=schedule, warmup_steps=warmup, lr_min_ratio=ratio)
    sched = make_lr_scheduler(opt, cfg, total)
    out = [opt.param_groups[0]["lr"]]
    for _ in range(run if run is not None else (total or steps)):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_cosine_ends_at_the_floor(ratio):
    v = lrs("cosine", steps=20, ratio=ratio)
    assert v[0] == pytest.approx(LR)
    assert v[20] == pytest.approx(LR * ratio, abs=1e-12)
    assert v[10] == pytest.approx(LR * (ratio + (1 - ratio) / 2))  # half way down the half period
    assert all(a >= b for a, b in zip(v, v[1:], strict=False))
    assert all(x == pytest.approx(LR * ratio, abs=1e-12) for x in lrs("cosine", 20, ratio=ratio, run=30)[20:])


def test_cosine_after_warmup_follows_the_half_cosine():
    v = lrs("cosine", steps=30, warmup=10, ratio=0.2)
    for s in range(10, 31):
        frac = (s - 10) / 20
        assert v[s] == pytest.approx(LR * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * frac))))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_ramps_linearly(schedule):
    v = lrs(schedule, steps=40, warmup=8, ratio=0.1)
    for s in range(9):
        assert v[s] == pytest.approx(LR * s / 8)
    assert max(v) == pytest.approx(LR)


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_linear_is_a_straight_line_to_the_floor(ratio):
    v = lrs("linear", steps=24, warmup=4, ratio=ratio)
    for s in range(4, 25):
        assert v[s] == pytest.approx(LR * (1 - (1 - ratio) * (s - 4) / 20))
    assert v[24] == pytest.approx(LR * ratio, abs=1e-12)
    assert lrs("linear", 24, warmup=4, ratio=ratio, run=30)[-1] == pytest.approx(LR * ratio, abs=1e-12)


def test_constant_is_constant():
    assert lrs("constant", steps=15, ratio=0.3) == pytest.approx([LR] * 16)


def test_total_steps_overrides_trainer_steps():
    v = lrs("linear", steps=100, total=10)
    assert v[10] == pytest.approx(0.0, abs=1e-12) and v[5] == pytest.approx(LR / 2)


def test_degenerate_cases_do_not_crash():
    assert lrs("cosine", steps=10, ratio=1.0) == pytest.approx([LR] * 11)  # floor = peak: no decay
    assert lrs("linear", steps=10, ratio=1.0) == pytest.approx([LR] * 11)
    v = lrs("linear", steps=3, warmup=50)  # a warm-up longer than the run (quickstart with trainer.steps=3)
    assert v == pytest.approx([0.0, LR / 50, 2 * LR / 50, 3 * LR / 50])
    assert lrs("cosine", steps=1) == pytest.approx([LR, 0.0])


def test_scheduler_state_round_trips():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    cfg = TrainerConfig(steps=20, lr=LR, lr_schedule="cosine", warmup_steps=5, lr_min_ratio=0.1)
    a = make_lr_scheduler(opt, cfg)
    for _ in range(7):
        opt.step()
        a.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    b = make_lr_scheduler(opt2, cfg)
    b.load_state_dict(a.state_dict())
    opt2.step()
    b.step()
    opt.step()
    a.step()
    assert b.get_last_lr() == pytest.approx(a.get_last_lr())


def test_bad_schedule_values_are_config_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ConfigError, match="total_steps=0"):
        make_lr_scheduler(opt, TrainerConfig(), total_steps=0)
    with pytest.raises(ConfigError, match="trainer.lr_schedule"):
        TrainerConfig(lr_schedule="exponential")
