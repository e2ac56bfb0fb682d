"""Health gates: check a finished (or running) run's metrics against bands from a rules file.

A gate turns the dashboard's "is this green?" into an exit code, so CI, sweeps and `mopd check` can
reject a run whose importance-sampling weights collapsed or whose rollout/trainer mismatch blew up
without anyone looking at a plot. Rules are YAML, one entry per metric name (or glob such as
`eval/*/acc`):

    rollout_corr/rollout_is_mean: {min: 0.5, max: 2.0}
    rollout_corr/rollout_is_eff_sample_size: {min: 0.3}
    rollout_corr/kl: {abs_max: 0.1}
    mopd/teacher_kl: {max: 5, after_step: 10}
    actor/grad_norm: {}            # no bounds: only "finite wherever logged"

Band keys are those of `stability.bands.Band`; gate-only keys: `allow_nan` (default false: a NaN or
infinite value is a violation, because a NaN health metric means the thing it measures broke) and
`required` (default false: a metric never logged is reported as skipped; true makes it a violation,
e.g. R3 agreement in a run that must replay routes). Any other key is an error naming the allowed
ones, so a typo such as `abs_min` cannot silently disable a gate.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stability.bands import BAND_KEYS, DEFAULT_BANDS, Band

#: Keys only the gates understand (bands ignore them).
GATE_KEYS = ("allow_nan", "required")
RULE_KEYS = (*BAND_KEYS, *GATE_KEYS)

#: `mopd.jsonl` writes +-inf as +-1e308 (JSON has no infinity); read those back as infinite.
_INF_SENTINEL = 1e308

Series = dict[str, list[tuple[int, float]]]


class RulesError(ValueError):
    """A rules file or mapping that cannot be used: wrong shape, unknown key, bad number."""


@dataclass(frozen=True)
class Rule:
    """One gate: a metric name or glob, its band, and what to do with NaN and absent metrics."""

    metric: str
    band: Band
    allow_nan: bool = False
    required: bool = False

    @property
    def is_glob(self) -> bool:
        return any(c in self.metric for c in "*?[")

    def matches(self, names: list[str]) -> list[str]:
        """The logged metric names this rule applies to."""
        if self.is_glob:
            return [n for n in names if fnmatch.fnmatchcase(n, self.metric)]
        return [self.metric] if self.metric in names else []


@dataclass(frozen=True)
class Violation:
    """One failed check. `step`/`value` are None for a required metric that was never logged."""

    metric: str
    step: int | None
    value: float | None
    band: str
    reason: str  # "out of band" | "non-finite" | "not logged"

    def __str__(self) -> str:
        if self.reason == "not logged":
            return f"{self.metric}: not logged (rule requires it; band {self.band})"
        return f"{self.metric} at step {self.step}: {_fmt(self.value)} {self.reason}, band {self.band}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "none"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.6g}"


# ---------------------------------------------------------------------------------------------- reading

@dataclass
class Skipped:
    """What a read of metrics.jsonl could not use, by line number (1-based): whole lines (not JSON, not an
    object, no numeric `step`) and single values that are not numbers where the same metric is a number on
    other lines (a field that is never a number, such as `data/batch_digest`, is a label, not a metric)."""

    path: Path
    lines: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    values: list[tuple[int, str, str]] = field(default_factory=list)  # (line, metric, the value's repr)

    def __bool__(self) -> bool:
        return bool(self.lines or self.values)

    def describe(self, limit: int = 5) -> str:
        """One line: `PATH: N line(s) skipped (line 3: not JSON; ...) and M non-numeric value(s) ignored (...)`."""
        parts = []
        if self.lines:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.lines[:limit])
            more = f"; and {len(self.lines) - limit} more" if len(self.lines) > limit else ""
            parts.append(f"{len(self.lines)} line(s) skipped ({shown}{more})")
        if self.values:
            shown = "; ".join(f"line {n}: {m} = {v}" for n, m, v in self.values[:limit])
            more = f"; and {len(self.values) - limit} more" if len(self.values) > limit else ""
            parts.append(f"{len(self.values)} non-numeric value(s) ignored ({shown}{more})")
        return f"{self.path}: " + " and ".join(parts)


def read_series(run_dir: str | Path) -> Series:
    """Per-metric `(step, value)` lists, sorted by step, from `RUN_DIR/metrics.jsonl` (what it could not use is
    dropped: `read_series_checked` says what that was)."""
    return read_series_checked(run_dir)[0]


def read_series_checked(run_dir: str | Path) -> tuple[Series, Skipped]:
    """Per-metric `(step, value)` lists, sorted by step, from `RUN_DIR/metrics.jsonl`, and what was skipped.

    Train and eval metrics of one step may sit on separate lines; both are merged by metric name. If a
    step repeats for the same metric the last line wins (what the run last said). null becomes NaN and
    the +-1e308 sentinel becomes +-inf, so the gates see non-finite values for what they were. A line
    that does not parse (a torn write, a run still writing) is skipped rather than failing the whole read, and
    so is a non-numeric value; both are listed in the returned `Skipped` with their line numbers (`mopd check`
    and `mopd dashboard` report them, and refuse them under --strict).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"run dir {run_dir} does not exist (no metrics.jsonl): pass the folder a run "
                                    "wrote, e.g. runs/<experiment>")
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl, so it is not a run directory (a run writes "
                                f"{path} from its first step): pass the run's folder")
    skipped = Skipped(path)
    odd: list[tuple[int, str, str]] = []  # non-numeric values; kept for the metrics numeric elsewhere
    by_metric: dict[str, dict[int, float]] = {}
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.lines.append((n, "not UTF-8"))
            continue
        except json.JSONDecodeError:
            skipped.lines.append((n, "not JSON"))
            continue
        if not isinstance(row, dict):
            skipped.lines.append((n, f"a JSON {type(row).__name__}, not an object"))
            continue
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int | float):
            skipped.lines.append((n, f"step is {step!r}, not a number"))
            continue
        for k, v in row.items():
            if k == "step":
                continue
            if v is None:
                val = math.nan
            elif isinstance(v, bool) or not isinstance(v, int | float):
                odd.append((n, k, repr(v)[:40]))
                continue
            else:
                val = float(v)
                if abs(val) >= _INF_SENTINEL:
                    val = math.copysign(math.inf, val)
            by_metric.setdefault(k, {})[int(step)] = val
    skipped.values = [x for x in odd if x[1] in by_metric]
    return {k: sorted(d.items()) for k, d in by_metric.items()}, skipped


# ---------------------------------------------------------------------------------------------- rules

def _number(metric: str, key: str, v: Any) -> float | int:
    # PyYAML reads `1e-3` (no dot) as a string; accept any string float() takes, reject the rest.
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise RulesError(f"rule {metric!r}: {key} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        raise RulesError(f"rule {metric!r}: {key} must be a number, got {v!r}")
    return v


def parse_rule(metric: str, spec: Any) -> Rule:
    """Validate one rules-file entry; every error names the metric and the offending key."""
    if not isinstance(metric, str) or not metric:
        raise RulesError(f"rule names must be non-empty metric names, got {metric!r}")
    if spec is None:
        raise RulesError(f"rule {metric!r} is empty; give a mapping of {', '.join(RULE_KEYS)} "
                         "(use {} to only require finite values)")
    if not isinstance(spec, Mapping):
        raise RulesError(f"rule {metric!r} must be a mapping of {', '.join(RULE_KEYS)}, got {spec!r}")
    unknown = [k for k in spec if k not in RULE_KEYS]
    if unknown:
        close = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), RULE_KEYS, 1, 0.6))
                 else repr(k) for k in unknown]
        raise RulesError(f"rule {metric!r}: unknown key(s) {', '.join(close)}; allowed: {', '.join(RULE_KEYS)}")
    band_kw: dict[str, Any] = {}
    for k in ("min", "max", "abs_max"):
        if spec.get(k) is not None:
            band_kw[k] = _number(metric, k, spec[k])
    if spec.get("after_step") is not None:
        a = spec["after_step"]
        if isinstance(a, bool) or not isinstance(a, int):
            raise RulesError(f"rule {metric!r}: after_step must be an integer step, got {a!r}")
        band_kw["after_step"] = a
    flags: dict[str, bool] = {}
    for k in GATE_KEYS:
        if k in spec:
            if not isinstance(spec[k], bool):
                raise RulesError(f"rule {metric!r}: {k} must be true or false, got {spec[k]!r}")
            flags[k] = spec[k]
    try:
        band = Band(**band_kw)
    except ValueError as e:
        raise RulesError(f"rule {metric!r}: {e}") from None
    return Rule(metric=metric, band=band, **flags)


def load_rules(source: str | Path | Mapping[str, Any] | list[Rule] | None) -> list[Rule]:
    """Rules from a YAML file path, an already-parsed mapping, a list of `Rule`s, or None (defaults)."""
    if source is None:
        return default_rules()
    if isinstance(source, list):
        if not all(isinstance(r, Rule) for r in source):
            raise RulesError("rules must be a mapping of metric name -> band (or a list of "
                             "stability.gates.Rule), got a list of something else")
        return list(source)
    if isinstance(source, str | Path):
        import yaml

        path = Path(source)
        if not path.is_file():
            raise RulesError(f"rules file {path} not found")
        if path.is_dir():
            raise RulesError(f"rules file {path} is a folder; pass a YAML file (e.g. configs/gates/default.yaml)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise RulesError(f"rules file {path} is not valid YAML{_yaml_where(e)} (check brackets, quotes, "
                             "indentation and colons)") from None
        except UnicodeDecodeError as e:
            raise RulesError(f"rules file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        if data is None:
            raise RulesError(f"rules file {path} is empty")
        if not isinstance(data, Mapping):
            raise RulesError(f"rules file {path} must be a mapping of metric name -> band, "
                             f"got {type(data).__name__}")
        source = data
    if not isinstance(source, Mapping):
        raise RulesError(f"rules must be a mapping of metric name -> band, got {type(source).__name__}")
    return [parse_rule(m, spec) for m, spec in source.items()]


def _yaml_where(e: Exception) -> str:
    """` at line L, column C: problem` from a PyYAML error, on one line."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [""])[0]
    context = getattr(e, "context", None)
    what = " ".join((f"{context}: {problem}" if context else str(problem)).split())
    return f"{where}: {what}" if what else where


def default_rules() -> list[Rule]:
    """The design reference's bands (`stability.bands.DEFAULT_BANDS`) as gate rules."""
    return [Rule(metric=m, band=b) for m, b in DEFAULT_BANDS.items()]


# ---------------------------------------------------------------------------------------------- checking

def check_series(series: Series, rules: list[Rule]) -> list[Violation]:
    """Every (metric, step) whose value leaves its band or is non-finite, in rule then step order."""
    names = sorted(series)
    out: list[Violation] = []
    for rule in rules:
        matched = rule.matches(names)
        if not matched and rule.required:
            out.append(Violation(rule.metric, None, None, rule.band.describe(), "not logged"))
        for metric in matched:
            for step, value in series[metric]:
                if not rule.band.applies(step):
                    continue
                if not math.isfinite(value):
                    if not rule.allow_nan:
                        out.append(Violation(metric, step, value, rule.band.describe(), "non-finite"))
                elif not rule.band.contains(value):
                    out.append(Violation(metric, step, value, rule.band.describe(), "out of band"))
    return out


def check_run(run_dir: str | Path, rules: str | Path | Mapping[str, Any] | list[Rule] | None
              ) -> list[Violation]:
    """Check `RUN_DIR/metrics.jsonl` against `rules` (file path, mapping, `Rule` list, or None for the
    defaults). Returns the violations; empty means the run passes. Raises `RulesError` for bad rules and
    `FileNotFoundError` when the run has no metrics."""
    parsed = load_rules(rules)
    return check_series(read_series(run_dir), parsed)


def format_report(run_dir: str | Path, rules: list[Rule], violations: list[Violation],
                  series: Series | None = None, max_per_metric: int = 5, skipped: Skipped | None = None) -> str:
    """A readable report: what metrics.jsonl held that could not be read (`skipped`), per rule what was
    checked, the violations grouped by metric (first few steps and a count, so a run that failed at every step
    stays readable), and a PASS/FAIL line."""
    series = read_series(run_dir) if series is None else series
    names = sorted(series)
    lines = [f"check {run_dir}: {len(rules)} rule(s)"]
    if skipped:
        lines.append(f"  not checked: {skipped.describe()}")
    by_metric: dict[str, list[Violation]] = {}
    for v in violations:
        by_metric.setdefault(v.metric, []).append(v)
    checked = 0
    for rule in rules:
        matched = rule.matches(names)
        if not matched:
            state = "FAIL (not logged, required)" if rule.required else "skipped (not logged)"
            lines.append(f"  {rule.metric:<36} {rule.band.describe():<28} {state}")
            continue
        for metric in matched:
            vals = [v for s, v in series[metric] if rule.band.applies(s)]
            checked += len(vals)
            bad = [v for v in by_metric.get(metric, []) if v.band == rule.band.describe()]
            state = f"FAIL ({len(bad)} of {len(vals)} values)" if bad else f"ok ({len(vals)} values)"
            lines.append(f"  {metric:<36} {rule.band.describe():<28} {state}")
    if violations:
        lines.append("violations:")
        for metric, vs in by_metric.items():
            for v in vs[:max_per_metric]:
                lines.append(f"  {v}")
            if len(vs) > max_per_metric:
                rest = vs[max_per_metric:]
                lines.append(f"  {metric}: ... and {len(rest)} more (steps {rest[0].step}-{rest[-1].step})")
        lines.append(f"FAIL: {len(violations)} violation(s) in {len(by_metric)} metric(s)")
    else:
        lines.append(f"PASS: {checked} value(s) checked, no violations")
    return "\n".join(lines)
