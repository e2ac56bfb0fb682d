"""R3 off vs on on the quickstart MoE student: same seed, same steps, bf16 rollout engines against an
fp32 trainer (the train/inference mismatch R3 exists for). Prints router agreement, train/inference
k3 KL and extreme-token fraction over the first and last steps, and the on/off ratios.

    .venv/bin/python benchmarks/r3_offon.py [CONFIG] [key=value ...]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

KEYS = ["r3/router_agreement", "r3/own_router_agreement", "rollout_corr/k3_kl",
        "rollout_corr/extreme_token_frac@2", "training/rollout_probs_diff_max", "icepop/masked_frac"]


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(vals) if vals else float("nan")


def main(argv: list[str]) -> None:
    from mopd.config import load_config
    from mopd.jsonl import read_metrics
    from mopd.report import markdown_table
    from mopd.train import train
    from mopd.world.prepare import prepare_world
    from stability.dashboard import render_dashboard

    config = argv[0] if argv and "=" not in argv[0] else "configs/quickstart.yaml"
    overrides = [a for a in argv if "=" in a]
    base = ["trainer.steps=30", "trainer.max_wallclock_s=0", "rollout.dtype=bfloat16", "logging.progress_bar=false",
            "trainer.save_every=0", "algorithm.correction=none", *overrides]
    runs = {"r3_off": ["algorithm.r3=false", "algorithm.r3_capture=true"], "r3_on": ["algorithm.r3=true"]}
    series = {}
    for name, extra in runs.items():
        cfg = load_config(config, [*base, *extra, f"experiment={name}", f"logging.run_dir=runs/r3/{name}"])
        prepare_world(cfg)
        train(cfg, log=lambda *_: None, overwrite=True)  # a benchmark re-runs into the same folders
        series[name] = [m for m in read_metrics(f"runs/r3/{name}/metrics.jsonl") if "rollout_corr/k3_kl" in m]
    rows = []
    for key in KEYS:
        row = [key]
        for name in runs:
            s = series[name]
            k = max(1, len(s) // 5)
            row += [_mean(s[:k], key), _mean(s[-k:], key)]
        row.append(_mean(series["r3_on"], key) / _mean(series["r3_off"], key) if _mean(series["r3_off"], key) else float("nan"))
        rows.append(row)
    print(markdown_table(["metric", "off first", "off last", "on first", "on last", "on/off (all steps)"], rows))
    out = render_dashboard([Path("runs/r3/r3_off"), Path("runs/r3/r3_on")], Path("runs/r3/dashboard.html"))
    print(f"dashboard: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
