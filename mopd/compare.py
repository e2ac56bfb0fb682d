"""Several objectives on the same world at equal wall-clock, one table per domain.

Each run is `base` + its overrides with `trainer.max_wallclock_s = budget_s` (step time only; the
before/after evaluations are not charged), so a cheaper objective gets more steps, as it would in
practice, and `trainer.schedule_horizon = wallclock`, so every run's LR schedule (warm-up, decay) spans
its budget whatever its step count: a comparison does not stop runs halfway through their decay.

A spec's `base` names the config file the runs start from, relative to the working directory as CONFIG on
the command line is (a config file's own `base:` is relative to that file); the spec itself is no config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mopd.atomic import write_text
from mopd.config import ConfigError, MopdConfig, load_config
from mopd.report import headroom_captured, markdown_table
from mopd.run_dir import RunDirError, hold_run_dir, holds_run
from mopd.train import train

SPEC_KEYS = ("base", "budget_s", "out_dir", "runs")
_SPEC_SHAPE = "base: configs/quickstart.yaml, budget_s: 600, runs: {NAME: [key=value, ...]}"


def load_spec(spec_path: str | Path) -> dict[str, Any]:
    """The spec, checked: a readable YAML mapping of base (a config file other than the spec), budget_s (> 0),
    out_dir and at least one run (name -> list of `key=value` overrides). Raises ConfigError naming the
    spec, the key and the fix."""
    p = Path(spec_path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "not found"
        raise ConfigError(f"compare spec {p} {what}: give the path of a spec file like configs/compare.yaml "
                          f"({_SPEC_SHAPE})")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"compare spec {p} is not valid YAML{where}: {getattr(e, 'problem', None) or e} "
                          "(check brackets, quotes and indentation)") from None
    except (OmegaConfBaseException, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"compare spec {p} cannot be read ({' '.join(str(e).split())[:200]}): give a YAML "
                          f"mapping like {_SPEC_SHAPE}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"compare spec {p}: the top level is {type(spec).__name__ if spec is not None else 'empty'}; "
                          f"give a mapping like {_SPEC_SHAPE}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"compare spec {p}: unknown keys {unknown}; allowed: {', '.join(SPEC_KEYS)}")
    base = spec.get("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"compare spec {p}: base: got {base!r}; give the experiment config the runs start from "
                          "(relative to where `mopd compare` runs), e.g. base: configs/quickstart.yaml")
    if Path(base).expanduser().resolve() == p.resolve():
        raise ConfigError(f"compare spec {p}: base: {base} names the spec itself; base names the experiment config "
                          "the runs start from (a config file, not a compare spec), e.g. base: configs/quickstart.yaml")
    budget = spec.get("budget_s")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"compare spec {p}: budget_s: got {budget!r}; give each run's step time in seconds, a "
                          "number > 0 (e.g. budget_s: 600)")
    runs = spec.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"compare spec {p} defines no runs (runs: {runs!r}); give at least one, NAME: [key=value, "
                          "...] each, e.g. runs: {reverse_kl: [algorithm.objective=reverse_kl]}")
    for name, over in runs.items():
        if over is None:
            runs[name] = over = []
        if not isinstance(over, list) or not all(isinstance(o, str) for o in over):
            raise ConfigError(f"compare spec {p}: runs.{name}: got {over!r}; give a list of key=value overrides "
                              "(or [] for the base config as it is)")
    return spec


def compare(spec_path: str, overrides: list[str], only: list[str] | None = None, log=print,
            prepare: Callable[[MopdConfig], object] | None = None, overwrite: bool = False) -> str:
    """`prepare(cfg)` runs before each run (the CLI passes the quickstart world's builder); `overwrite`
    replaces earlier runs of the same names (without it their folders are refused, never lost). Every run's
    config and run dir are checked, and every run dir locked (one writer per run dir), before the first run
    starts: a typo in the last run, or a dir another process writes, fails at once, not an hour in."""
    spec = load_spec(spec_path)
    out = Path(spec.get("out_dir", "runs/compare"))
    names = only or list(spec["runs"])
    missing = sorted(set(names) - set(spec["runs"]))
    if missing:
        raise ConfigError(f"unknown run names {missing}; {spec_path} defines: {sorted(spec['runs'])}")
    cfgs = {name: load_config(spec["base"], [*spec["runs"][name], *overrides, f"experiment={name}",
                                             f"logging.run_dir={out / name}", "trainer.schedule_horizon=wallclock",
                                             f"trainer.max_wallclock_s={spec['budget_s']}", "trainer.save_every=0"])
            for name in names}
    fresh = {}
    with ExitStack() as held:
        for name, cfg in cfgs.items():
            run_dir = Path(cfg.logging.run_dir)
            held.enter_context(hold_run_dir(run_dir, overwrite=overwrite, log=log))
            present = holds_run(run_dir)
            if present and not overwrite:
                raise RunDirError(f"run dir {run_dir} of run '{name}' already holds a run ({', '.join(present)}): "
                                  "replace it with --overwrite, leave it out with --only, or set out_dir")
        for name, cfg in cfgs.items():
            if prepare is not None:
                prepare(cfg)
            log(f"== {name}: {' '.join(spec['runs'][name])} for {spec['budget_s']} s")
            fresh[name] = train(cfg, log=log, overwrite=overwrite)
    results = gather_results(out, list(spec["runs"]), fresh, spec["budget_s"], log=log)
    table = comparison_table(results)
    write_text(out / "comparison.md", table + "\n")
    write_text(out / "comparison.json", json.dumps(results, indent=2))
    log(table)
    return table


def gather_results(out: Path, names: list[str], fresh: dict[str, dict], budget_s: float,
                   log=print) -> dict[str, dict]:
    """The table covers every run of the spec that has a result, in the spec's order: an 80-minute
    comparison is often run a few runs at a time (`--only`), and each call should print the whole table.
    An earlier run is reused only if it was trained for this spec's budget."""
    results = {}
    for name in names:
        if name in fresh:
            results[name] = fresh[name]
            continue
        result, config = out / name / "result.json", out / name / "config.yaml"
        if not (result.exists() and config.exists()):
            continue
        budget = OmegaConf.load(config).trainer.max_wallclock_s
        if budget != budget_s:
            log(f"not in the table: {out / name} was trained for {budget} s, this spec's budget is {budget_s} s")
            continue
        log(f"in the table from an earlier call: {out / name}")
        results[name] = json.loads(result.read_text())
    return results


def comparison_table(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    parts = []
    for d in first["before"]:
        rows = [[name, r["steps"], round(r["train_s"]), r["before"][d]["acc"], r["after"][d]["acc"],
                 r.get("teacher", {}).get(d, float("nan")),
                 headroom_captured(r["before"][d]["acc"], r["after"][d]["acc"], r.get("teacher", {}).get(d, float("nan"))),
                 r["before"][d]["teacher_kl"], r["after"][d]["teacher_kl"]]
                for name, r in results.items()]
        parts.append(f"### {d}\n\n" + markdown_table(
            ["run", "steps", "train s", "student before", "student after", "teacher", "headroom captured",
             "teacher KL before", "teacher KL after"], rows))
    return "\n\n".join(parts)
