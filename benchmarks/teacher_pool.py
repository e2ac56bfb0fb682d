"""Six teachers on dedicated engines vs on a pool of two, and three dedicated engines as the memory
yardstick (printed, never asserted).

    .venv/bin/python benchmarks/teacher_pool.py [--steps 40] [--staleness 1] [--arms dedicated pool]
    .venv/bin/python benchmarks/teacher_pool.py --wallclock 600 --arms dedicated pool   # accuracy each way

Runs `mopd train` on configs/quickstart_6teacher.yaml (an engine per teacher), on
configs/quickstart_6teacher_pool.yaml (the six teachers on two pooled engines, swapped in by in-place weight
loads) and on the six-teacher world served by three dedicated engines (`three`: the same run with three of the
teachers, each scoring two domains, so the data and the scoring work are the six-teacher runs' and only the
number of teacher engines differs), one after the other, with the same seed and steps, and prints per run: the
summed PSS of every process of the run (`perf/pss_gb/total`, first step), the median step time after a warm-up
and its ratio to the dedicated run's, swaps per step and swap seconds per step, and the mean final greedy
accuracy over the six domains (the `three` arm's is not comparable: half its domains are scored by another
domain's teacher). The issue's memory target: the pool of two holds six teachers in no more than `three`.
With `--wallclock S` each run trains for S seconds of step time instead of a step count (its LR schedule
spanning them, as `mopd compare`). The per-domain final accuracies are printed with the binomial standard error
of one domain's accuracy on its eval prompts; at equal steps the dedicated and pooled arms must agree exactly.
The world (.cache/world6) is built on the first run if missing (minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SIX = "configs/quickstart_6teacher.yaml"
RUNS = {"dedicated": ("6 dedicated (7 engines)", SIX), "pool": ("pool of 2 (3 engines)",
                                                               "configs/quickstart_6teacher_pool.yaml"),
        "three": ("3 dedicated (4 engines)", None)}
# The `three` arm: three of the six teachers, each scoring its own domain and one more.
THREE = {"add_teacher": ["add", "max"], "rev_teacher": ["rev", "rot"], "sort_teacher": ["sort", "spell"]}
WARMUP = 5


def three_teacher_config(out: Path) -> str:
    """configs/quickstart_6teacher.yaml resolved, with its teachers cut to `THREE` (a YAML file cannot drop a
    base's teacher, so the resolved config is written whole)."""
    sys.path.insert(0, str(REPO))
    import mopd.world  # noqa: F401 - registers the world section
    from mopd.config import load_config, to_yaml

    tree = yaml.safe_load(to_yaml(load_config(str(REPO / SIX))))
    tree["experiment"] = "quickstart_6teacher_three"
    tree["teachers"] = {n: {**tree["teachers"][n], "domains": doms} for n, doms in THREE.items()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quickstart_6teacher_three.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def run(config: str, run_dir: Path, steps: int, staleness: int, wallclock: float = 0.0) -> dict:
    budget = [f"trainer.max_wallclock_s={wallclock}", "trainer.schedule_horizon=wallclock"] if wallclock else \
        ["trainer.max_wallclock_s=0"]
    cmd = [str(REPO / ".venv/bin/mopd"), "train", config, f"trainer.steps={steps}", f"trainer.max_staleness={staleness}",
           f"logging.run_dir={run_dir}", "logging.progress_bar=false", "trainer.eval_every=0",
           "trainer.save_every=0", *budget]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps_m = [m for m in records if "timing_s/step" in m]
    result = json.loads((run_dir / "result.json").read_text())
    after = result.get("after", {})
    later = steps_m[WARMUP:] or steps_m
    return {
        "pss_gb": next((m["perf/pss_gb/total"] for m in steps_m if "perf/pss_gb/total" in m), float("nan")),
        "step_s": statistics.median(m["timing_s/step"] for m in later),
        "swaps": statistics.mean(m.get("pool/swaps", 0.0) for m in later),
        "swap_s": statistics.mean(m.get("timing_s/pool_swap", 0.0) for m in later),
        "teacher_s": statistics.mean(m.get("timing_s/teacher", 0.0) for m in later),
        "acc": statistics.mean(v["acc"] for v in after.values()) if after else float("nan"),
        "acc_by_domain": {d: v["acc"] for d, v in sorted(after.items())},
        "prompts": {d: int(v.get("prompts", 0)) for d, v in after.items()},
        "steps": len(steps_m),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--staleness", type=int, default=1, help="trainer.max_staleness of every run")
    ap.add_argument("--out", default="runs/bench_teacher_pool")
    ap.add_argument("--arms", nargs="+", choices=list(RUNS), default=list(RUNS),
                    help="which runs (the step time ratio is to the first one's)")
    ap.add_argument("--wallclock", type=float, default=0.0,
                    help="train each run for this many seconds of step time (--steps then only caps it)")
    args = ap.parse_args()
    steps = args.steps if not args.wallclock else max(args.steps, 100_000)
    got = {}
    for arm in args.arms:
        label, cfg = RUNS[arm]
        got[label] = run(cfg or three_teacher_config(REPO / args.out), REPO / args.out / arm, steps,
                         args.staleness, args.wallclock)
    base = next(iter(got.values()))
    budget = f"{args.wallclock:.0f} s of step time" if args.wallclock else f"{args.steps} steps"
    print(f"six domains, {budget}, trainer.max_staleness={args.staleness}\n")
    print("| engines | summed PSS (GB) | step s (median) | step time ratio | swaps/step | swap s/step | "
          "teacher s/step | final acc (mean of 6) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in got.items():
        print(f"| {name} | {r['pss_gb']:.2f} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}x | "
              f"{r['swaps']:.1f} | {r['swap_s']:.3f} | {r['teacher_s']:.3f} | {r['acc']:.3f} |")
    # Per domain: at equal steps the arms train on identical batches and scores, so they must agree exactly;
    # at equal wall-clock (different step counts) within the run-to-run spread.
    domains = sorted({d for r in got.values() for d in r["acc_by_domain"]})
    print("\nfinal greedy accuracy per domain, +- one binomial standard error on its eval prompts\n")
    print("| engines | steps | " + " | ".join(domains) + " |")
    print("|---|---|" + "---|" * len(domains))
    for name, r in got.items():
        cells = [f"{r['acc_by_domain'][d]:.3f} +- {_se(r['acc_by_domain'][d], r['prompts'][d]):.3f}"
                 if d in r["acc_by_domain"] else "-" for d in domains]
        print(f"| {name} | {r['steps']} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def _se(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


if __name__ == "__main__":
    main()
