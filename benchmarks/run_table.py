"""One table of finished runs, from what each run wrote to its run dir (`metrics.jsonl`, `result.json`):
tokens/s, the per-stage step breakdown, summed memory, router agreement and after/teacher per domain.

    .venv/bin/python benchmarks/run_table.py RUN_DIR [RUN_DIR ...]

Step figures are medians over the logged steps after the first (which pays for warm-up); memory is the run's
peak. `scripts/gpu_acceptance.sh` prints its table with this.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mopd.jsonl import read_metrics  # noqa: E402
from mopd.report import markdown_table  # noqa: E402

STAGES = ["wait_rollout", "wait_teacher", "old_log_prob", "train", "sync", "other"]


def summarize(run_dir: Path) -> dict[str, object]:
    """The figures of one run dir; NaN for what it did not log."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in rows if "timing_s/step" in m][1:] or [m for m in rows if "timing_s/step" in m]

    def med(key: str) -> float:
        vals = [float(m[key]) for m in steps if isinstance(m.get(key), int | float)]
        return statistics.median(vals) if vals else float("nan")

    def peak(key: str) -> float:
        vals = [float(m[key]) for m in rows if isinstance(m.get(key), int | float)]
        return max(vals) if vals else float("nan")

    out: dict[str, object] = {"run": run_dir.name, "steps": max((int(m["step"]) for m in steps), default=0),
                              "tokens/s": med("perf/tokens_per_s"), "step s": med("timing_s/step")}
    out.update({f"{s} s": med(f"timing_s/{s}") for s in STAGES})
    out.update({"mem GB": peak("perf/mem_gb/total"), "PSS GB": peak("perf/pss_gb/total"),
                "r3 agreement": med("r3/own_router_agreement")})
    result = run_dir / "result.json"
    if result.is_file():
        r = json.loads(result.read_text())
        ratios = []
        for d, after in sorted(r.get("after", {}).items()):
            teacher = r.get("teacher", {}).get(d)
            ratios.append(f"{d} {after['acc'] / teacher:.2f}" if teacher else f"{d} {after['acc']:.2f} (no teacher)")
        out["after/teacher"] = ", ".join(ratios)
    else:
        out["after/teacher"] = "no result.json (the run did not finish)"
    return out


def table(run_dirs: list[Path]) -> str:
    rows = [summarize(d) for d in run_dirs]
    header = list(rows[0]) if rows else []
    return markdown_table(header, [[r[h] for h in header] for r in rows])


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv]
    missing = [str(d) for d in dirs if not (d / "metrics.jsonl").is_file()]
    if not dirs or missing:
        print(f"run_table: error: no metrics.jsonl in {', '.join(missing) or '(no run dir given)'}; pass run dirs "
              "written by `mopd train`", file=sys.stderr)
        return 2
    print(table(dirs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
