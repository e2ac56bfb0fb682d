"""Per-stage step times of the MOPD loop on the quickstart world (printed, never asserted).

    .venv/bin/python benchmarks/step_breakdown.py [CONFIG] [key=value ...]

Runs `trainer.steps` real steps (default 10) through the engine actors and reports, per stage, the
mean time (rollout, teacher, old_log_prob, train, sync), tokens/s, and the ratio of the
whole step to its slowest stage alone (1.0 would mean the other stages cost nothing).
"""

from __future__ import annotations

import statistics
import sys

STAGES = ["rollout", "teacher", "old_log_prob", "train", "sync"]


def main(argv: list[str]) -> None:
    from mopd.config import load_config
    from mopd.jsonl import read_metrics
    from mopd.train import train
    from mopd.world.prepare import prepare_world

    config = argv[0] if argv and "=" not in argv[0] else "configs/quickstart.yaml"
    overrides = [a for a in argv if "=" in a]
    cfg = load_config(config, ["trainer.steps=10", "logging.run_dir=runs/bench", "logging.progress_bar=false",
                               "trainer.save_every=0", *overrides])
    prepare_world(cfg)
    train(cfg, log=lambda *_: None, overwrite=True)  # a benchmark re-runs into the same folder
    steps = [m for m in read_metrics(f"{cfg.logging.run_dir}/metrics.jsonl") if "timing_s/step" in m][1:]
    if not steps:
        print("need at least 2 steps (the first is dropped as warm-up)")
        return
    mean = {s: statistics.mean(m[f"timing_s/{s}"] for m in steps) for s in STAGES}
    step = statistics.mean(m["timing_s/step"] for m in steps)
    tok = statistics.mean(m["perf/tokens_per_s"] for m in steps)
    slowest = max(mean, key=mean.get)
    print(f"{len(steps)} steps (after 1 warm-up), {cfg.trainer.prompts_per_step} prompts x n={cfg.rollout.n}, "
          f"objective={cfg.algorithm.objective}")
    print(f"{'stage':<12}{'mean s':>10}{'share':>9}")
    for s in STAGES:
        print(f"{s:<12}{mean[s]:>10.4f}{mean[s] / step:>9.1%}")
    other = step - sum(mean.values())
    print(f"{'other':<12}{other:>10.4f}{other / step:>9.1%}")
    print(f"{'step':<12}{step:>10.4f}")
    print(f"response tokens/s: {tok:.0f}")
    print(f"step / slowest stage ({slowest}): {step / mean[slowest]:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
