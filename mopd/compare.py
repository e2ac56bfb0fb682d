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
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from mopd.atomic import write_text
from mopd.config import ConfigError, MopdConfig, load_config
from mopd.report import headroom_captured, markdown_table
from mopd.train import train


def compare(spec_path: str, overrides: list[str], only: list[str] | None = None, log=print,
            prepare: Callable[[MopdConfig], object] | None = None, overwrite: bool = False) -> str:
    """`prepare(cfg)` runs before each run (the CLI passes the quickstart world's builder); `overwrite`
    replaces earlier runs of the same names (without it their folders are refused, never lost)."""
    spec = OmegaConf.to_container(OmegaConf.load(spec_path))
    unknown = sorted(set(spec) - {"base", "budget_s", "out_dir", "runs"})
    if unknown:
        raise ConfigError(f"{spec_path}: unknown keys {unknown}; allowed: base, budget_s, out_dir, runs")
    out = Path(spec.get("out_dir", "runs/compare"))
    names = only or list(spec["runs"])
    missing = sorted(set(names) - set(spec["runs"]))
    if missing:
        raise ConfigError(f"unknown run names {missing}; {spec_path} defines: {sorted(spec['runs'])}")
    fresh = {}
    for name in names:
        cfg = load_config(spec["base"], [*spec["runs"][name], *overrides, f"experiment={name}",
                                         f"logging.run_dir={out / name}", "trainer.schedule_horizon=wallclock",
                                         f"trainer.max_wallclock_s={spec['budget_s']}", "trainer.save_every=0"])
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
