"""Learning-rate schedules of `trainer.lr_schedule`, built from transformers' schedulers.

One meaning for every schedule, in scheduler positions (the number of `scheduler.step()` calls so far,
i.e. optimizer updates already taken; the update at position `s` uses the lr of position `s`):

- warm-up: `lr * s / warmup_steps` for `s < warmup_steps` (transformers' convention: the first update of a
  warm-up runs at lr 0, as in verl, which builds its schedules the same way);
- `constant`: `lr` after the warm-up;
- `cosine`: from `lr` at the end of the warm-up down to `lr * lr_min_ratio` at position `total_steps`
  (`get_cosine_with_min_lr_schedule_with_warmup`, half a cosine period);
- `linear`: the same end points on a straight line (`get_polynomial_decay_schedule_with_warmup`, power 1,
  `lr_end = lr * lr_min_ratio`).

`total_steps` defaults to `trainer.steps`. Past it, cosine and linear hold the floor (transformers' cosine
alone would start rising again). A warm-up as long as the run or longer never reaches the decay.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from mopd.config import ConfigError, LrSchedule

__all__ = ["make_lr_scheduler"]


def _hold_after(base: Any, total: int, floor: float, step: int) -> float:
    return floor if step >= total else base(step)


def make_lr_scheduler(optimizer: Optimizer, trainer_cfg: Any, total_steps: int | None = None) -> LambdaLR:
    """The `LambdaLR` for `trainer_cfg.lr_schedule` (constant | cosine | linear) with `warmup_steps` and the
    `lr_min_ratio` floor, over `total_steps` (default `trainer_cfg.steps`) scheduler steps.

    The peak lr is the optimizer's own (`optimizer.defaults["lr"]`, i.e. trainer.lr); every param group is
    scaled by the same factor. Call it before `accelerate.prepare` / DeepSpeed wraps the optimizer.
    """
    total = int(trainer_cfg.steps if total_steps is None else total_steps)
    warmup = int(trainer_cfg.warmup_steps)
    ratio = float(getattr(trainer_cfg, "lr_min_ratio", 0.0))
    if total < 1:
        raise ConfigError(f"lr schedule: total_steps={total}; allowed: an integer >= 1 (trainer.steps)")
    if warmup < 0:
        raise ConfigError(f"config key 'trainer.warmup_steps': got {warmup}; allowed: an integer >= 0")
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"config key 'trainer.lr_min_ratio': got {ratio}; allowed: a number in [0, 1]")
    try:
        schedule = LrSchedule(trainer_cfg.lr_schedule)
    except ValueError:
        raise ConfigError(f"config key 'trainer.lr_schedule': got {trainer_cfg.lr_schedule!r}; allowed: "
                          f"{' | '.join(LrSchedule)}") from None

    if schedule == LrSchedule.constant or ratio == 1.0 or warmup >= total:
        # No decay: a flat schedule, a floor equal to the peak, or a warm-up that fills the whole run.
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    if schedule == LrSchedule.cosine:
        sched = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=ratio)
    else:
        lr = float(optimizer.defaults["lr"])
        sched = get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total, lr_end=lr * ratio, power=1.0)
    sched.lr_lambdas = [partial(_hold_after, f, total, ratio) for f in sched.lr_lambdas]
    return sched
