"""Health bands for training metrics, as data.

One definition serves both readers: the dashboard shades a band behind its metric's curve and marks
points outside it, and the gates (`stability.gates`) fail a run whose logged values leave it. Keeping
the numbers here, not in two places, is what stops "green on the dashboard" and "passes the gate" from
drifting apart. The defaults are the design reference's (verl's rollout-correction docs): IS mean in
[0.5, 2], effective sample size >= 0.3, |rollout KL| <= 0.1, keyed by verl's metric names
(`rollout_corr/rollout_is_mean`, `rollout_corr/rollout_is_eff_sample_size`, `rollout_corr/kl`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Keys a band accepts in a rules file (besides the gate-only keys in `stability.gates`).
BAND_KEYS = ("min", "max", "abs_max", "after_step")


@dataclass(frozen=True)
class Band:
    """An allowed interval for one metric.

    `min`/`max` bound the value itself, `abs_max` bounds its magnitude (for signed estimates such as a
    KL whose sampled mean can dip below zero). `after_step` exempts a warm-up: only steps strictly
    greater than it are checked (and shaded on the dashboard), because early values of e.g. teacher KL
    are legitimately large.
    """

    min: float | None = None
    max: float | None = None
    abs_max: float | None = None
    after_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("min", "max", "abs_max"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v)):
                raise ValueError(f"band {name} must be a number, got {v!r}")
        if self.abs_max is not None and self.abs_max < 0:
            raise ValueError(f"band abs_max must be >= 0, got {self.abs_max}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"band min {self.min} is above max {self.max}")
        a = self.after_step
        if a is not None and (isinstance(a, bool) or not isinstance(a, int)):
            raise ValueError(f"band after_step must be an integer step, got {a!r}")

    @property
    def bounded(self) -> bool:
        """Whether the band limits anything (a rule without bounds only checks finiteness)."""
        return self.min is not None or self.max is not None or self.abs_max is not None

    def applies(self, step: int) -> bool:
        """Whether `step` is past the warm-up this band ignores."""
        return self.after_step is None or step > self.after_step

    def limits(self) -> tuple[float | None, float | None]:
        """The effective [lo, hi] interval (None = unbounded), combining min/max with abs_max."""
        lo, hi = self.min, self.max
        if self.abs_max is not None:
            lo = -self.abs_max if lo is None else max(lo, -self.abs_max)
            hi = self.abs_max if hi is None else min(hi, self.abs_max)
        return lo, hi

    def contains(self, value: float) -> bool:
        """True when a finite value lies inside the band (edges included). Non-finite values never do."""
        if not math.isfinite(value):
            return False
        lo, hi = self.limits()
        return (lo is None or value >= lo) and (hi is None or value <= hi)

    def describe(self) -> str:
        """Human-readable band, e.g. `[0.5, 2]`, `>= 0.3`, `|x| <= 0.1`, with the warm-up if any."""
        parts = []
        if self.min is not None and self.max is not None:
            parts.append(f"[{self.min:g}, {self.max:g}]")
        elif self.min is not None:
            parts.append(f">= {self.min:g}")
        elif self.max is not None:
            parts.append(f"<= {self.max:g}")
        if self.abs_max is not None:
            parts.append(f"|x| <= {self.abs_max:g}")
        text = " and ".join(parts) if parts else "finite"
        if self.after_step is not None:
            text += f" (after step {self.after_step})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The band as a rules-file entry (only the keys that are set)."""
        return {k: getattr(self, k) for k in BAND_KEYS if getattr(self, k) is not None}


#: The design reference's health bands, drawn on the dashboard and used as the default gate rules.
DEFAULT_BANDS: dict[str, Band] = {
    "rollout_corr/rollout_is_mean": Band(min=0.5, max=2.0),
    "rollout_corr/rollout_is_eff_sample_size": Band(min=0.3),
    "rollout_corr/kl": Band(abs_max=0.1),
}
