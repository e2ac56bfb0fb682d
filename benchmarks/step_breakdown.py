"""Per-stage step times of the MOPD loop on the quickstart world (printed, never asserted).

    .venv/bin/python benchmarks/step_breakdown.py [CONFIG] [--vary KEY=V1,V2,...] [key=value ...]

Runs `trainer.steps` real steps (default 10) through the engine actors and reports, per stage, the mean
time (rollout, teacher, old_log_prob, train, sync, and the unaccounted rest `other`), tokens/s, and the ratio
of the whole step to its slowest stage alone (1.0 would mean the other stages cost nothing). With `--vary`
one run per value, side by side, and each run's tokens/s as a ratio of the first's, e.g.
`--vary trainer.max_staleness=0,1` (synchronous loop vs one-step-off pipeline) or
`--vary trainer.num_workers=1,2 trainer.num_cpus=0.5` (data-parallel trainer workers: on 2 cores the ratio
measures the overhead of the gradient all-reduce and the extra process more than a speed-up).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

# rollout and teacher: each stage's own duration; wait_*: what the step waited for them (the same in the
# synchronous loop; with trainer.max_staleness > 0 the pipeline hides the rest behind training).
STAGES = ["rollout", "teacher", "wait_rollout", "wait_teacher", "old_log_prob", "train", "sync", "other"]


class CpuWindow:
    """CPU seconds used by this process and all its descendants (the private Ray cluster: raylet, engines,
    teachers, trainer workers) between the first and the last logged step, sampled in a background thread.

    Busy share = CPU seconds / (wall x cores). A synchronous loop that keeps the cores `b` busy can gain at most
    1/b from overlapping its stages on the same cores; the rest of a pipeline's gain needs idle hardware."""

    def __init__(self, metrics_path: Path, every_s: float = 0.1) -> None:
        self.path, self.every_s = metrics_path, every_s
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu_s() -> float:
        me = psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # exited between the listing and the read
                pass
        return total

    def _steps_logged(self) -> int:
        try:
            return self.path.read_text().count('"timing_s/step"')
        except OSError:
            return 0

    def _run(self) -> None:
        seen = 0
        while not self._stop.wait(self.every_s):
            n = self._steps_logged()
            if n > seen:
                seen, point = n, (time.perf_counter(), self._cpu_s())
                if self.first is None:
                    self.first = point
                self.last = point

    def __enter__(self) -> CpuWindow:
        self.path.unlink(missing_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self) -> float:
        """Share of the machine's cores busy between the first and the last step (NaN: too few steps seen)."""
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return math.nan
        return (self.last[1] - self.first[1]) / ((self.last[0] - self.first[0]) * (os.cpu_count() or 1))


def run(config: str, overrides: list[str]) -> dict[str, float]:
    from mopd.config import load_config
    from mopd.jsonl import read_metrics
    from mopd.train import train
    from mopd.world.prepare import prepare_world

    cfg = load_config(config, ["trainer.steps=10", "logging.run_dir=runs/bench", "logging.progress_bar=false",
                               "trainer.save_every=0", *overrides])
    prepare_world(cfg)
    Path(cfg.logging.run_dir).mkdir(parents=True, exist_ok=True)
    with CpuWindow(Path(cfg.logging.run_dir) / "metrics.jsonl") as cpu:
        train(cfg, log=lambda *_: None, overwrite=True)  # a benchmark re-runs into the same folder
    steps = [m for m in read_metrics(f"{cfg.logging.run_dir}/metrics.jsonl") if "timing_s/step" in m][1:]
    if not steps:
        raise SystemExit("need at least 2 steps (the first is dropped as warm-up)")
    out = {s: statistics.mean(m.get(f"timing_s/{s}", 0.0) for m in steps) for s in STAGES}
    out["step"] = statistics.mean(m["timing_s/step"] for m in steps)
    out["tokens/s"] = statistics.mean(m["perf/tokens_per_s"] for m in steps)
    out["steps"] = len(steps)
    out["staleness"] = statistics.mean(m.get("rollout/staleness_mean", 0.0) for m in steps)
    every = read_metrics(f"{cfg.logging.run_dir}/metrics.jsonl")  # memory is read on step 1 and every 10th
    out["cpu_busy"] = cpu.busy()
    out["pss_gb"] = max((m["perf/pss_gb/total"] for m in every if "perf/pss_gb/total" in m), default=math.nan)
    # Weight sync per MB of parameters: the student's weights as the trainer sends them (fp32; frozen ones,
    # trainer.freeze, are not resent).
    import fnmatch

    from safetensors import safe_open

    numel = 0
    for f in Path(cfg.student.path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            numel += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys()
                         if not any(fnmatch.fnmatch(k, p) for p in cfg.trainer.freeze))
    out["weights_mb"] = numel * 4 / 1e6
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    ap.add_argument("--vary", default="", help="KEY=V1,V2,...: one run per value, side by side")
    args, overrides = ap.parse_known_args(argv)
    if args.config and "=" in args.config:
        overrides, args.config = [args.config, *overrides], "configs/quickstart.yaml"
    variants: list[tuple[str, list[str]]] = [("run", [])]
    if args.vary:
        key, _, values = args.vary.partition("=")
        variants = [(f"{key.split('.')[-1]}={v}", [f"{key}={v}"]) for v in values.split(",")]
    results = [(name, run(args.config, [*overrides, *extra])) for name, extra in variants]
    print(f"{int(results[0][1]['steps'])} steps each (after 1 warm-up); overrides: {' '.join(overrides) or '-'}")
    print(f"{'stage (mean s)':<16}" + "".join(f"{name:>18}" for name, _ in results))
    for s in [*STAGES, "step"]:
        print(f"{s:<16}" + "".join(f"{r[s]:>11.4f} {r[s] / r['step']:>6.1%}" for _, r in results))
    print(f"{'tokens/s':<16}" + "".join(f"{r['tokens/s']:>18.0f}" for _, r in results))
    base = results[0][1]["tokens/s"]
    print(f"{'tokens/s ratio':<16}" + "".join(f"{r['tokens/s'] / base:>17.2f}x" for _, r in results))
    slow = [(max((s for s in STAGES if s not in ("other", "wait_rollout", "wait_teacher")), key=r.get), r)
            for _, r in results]
    print(f"{'step / slowest':<16}" + "".join(f"{r['step'] / r[s]:>10.2f}x ({s[:5]})" for s, r in slow))
    print(f"{'summed PSS GB':<16}" + "".join(f"{r['pss_gb']:>18.2f}" for _, r in results)
          + "   (every process of the run's private Ray cluster)")
    print(f"{'CPU busy':<16}" + "".join(f"{r['cpu_busy']:>17.0%} " for _, r in results)
          + f"   (share of {os.cpu_count()} cores, the run's whole process tree, first to last step)")
    print(f"{'overlap ceiling':<16}" + "".join(f"{1 / r['cpu_busy']:>17.2f}x" for _, r in results)
          + "   (1 / busy: the most any overlap of this run's stages on these cores could gain)")
    print(f"{'staleness':<16}" + "".join(f"{r['staleness']:>18.2f}" for _, r in results))
    sent = ", ".join(f"{r['weights_mb']:.1f}" for _, r in results)
    print(f"{'sync s per MB':<16}" + "".join(f"{r['sync'] / r['weights_mb']:>18.5f}" for _, r in results)
          + f"   (weights sent {sent} MB fp32; with max_staleness > 0 the step does not wait "
            "for the engines to apply them)")


if __name__ == "__main__":
    main(sys.argv[1:])
