"""Per-stage step times of the MOPD loop on the quickstart world (printed, never asserted).

    .venv/bin/python benchmarks/step_breakdown.py [CONFIG] [--vary KEY=V1,V2,...] [key=value ...]

Runs `trainer.steps` real steps (default 10) through the engine actors and reports, per stage, the mean
time (rollout, teacher, old_log_prob, train, sync, and the unaccounted rest `other`), tokens/s, and the ratio
of the whole step to its slowest stage alone (1.0 would mean the other stages cost nothing). With `--vary`
one run per value, side by side, and each run's tokens/s as a ratio of the first's, e.g.
`--vary trainer.max_staleness=0,1` (synchronous loop vs one-step-off pipeline) or
`--vary trainer.num_workers=1,2 trainer.num_cpus=0.5` (data-parallel trainer workers: on 2 cores the ratio
measures the overhead of the gradient all-reduce and the extra process more than a speed-up). On a multi-turn
config (rows naming an `env`) it adds the environments' share of the step, turns, tool calls and the share of
observation tokens; tokens/s counts the student's tokens only, so `--vary rollout.max_turns=1,3` on
configs/quickstart_agent.yaml compares single-turn and multi-turn rollouts per student token.

    .venv/bin/python benchmarks/step_breakdown.py --sync [--buckets MB,MB,...] [--repeats N] [key=value ...]

measures weight sync alone, in one run: a real trainer actor and `rollout.num_engines` real vLLM engine actors,
`rollout.weight_sync=object_store` against `collective` at each bucket size, on a student of the quickstart's
shape and on a ~100 MB one of the same family (both built fresh into .cache/bench: sync speed depends on the
shapes, not the values). Each sync is timed from the driver's call until every engine holds the weights,
reloaded and repacked (`RemoteTrainer.sync(wait=True)`); the table gives MB/s of fp32 weights and the ratio to
the object store.
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
    # Multi-turn rows (an `env`): environment time (inside the rollout stage), turns, observation-token share.
    for key, name in (("timing_s/env", "env"), ("rollout/turns_mean", "turns"),
                      ("rollout/obs_token_share", "obs_share"), ("rollout/tool_calls_mean", "tool_calls")):
        out[name] = statistics.mean(m.get(key, 0.0) for m in steps)
    every = read_metrics(f"{cfg.logging.run_dir}/metrics.jsonl")  # memory is read on step 1 and every 10th
    out["cpu_busy"] = cpu.busy()
    out["pss_gb"] = max((m["perf/pss_gb/total"] for m in every if "perf/pss_gb/total" in m), default=math.nan)
    out["weights_mb"] = weights_mb(cfg.student.path, cfg.trainer.freeze)  # weight sync per MB of parameters
    return out


# A student of the quickstart's family and ~100 MB of fp32 weights (25M parameters) that two cores still run.
SYNC_STUDENTS = {"quickstart": {}, "100MB": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                                 num_key_value_heads=4, head_dim=64, moe_intermediate_size=448)}


def sync_students(root: Path) -> dict[str, str]:
    """The benchmark's students (built once into `root`): name -> model folder."""
    from mopd.world.models import build_student, save_model
    from mopd.world.tokenizer import build_tokenizer

    out = {}
    for name, size in SYNC_STUDENTS.items():
        path = root / f"student_{name}"
        if not (path / "config.json").exists():
            tok = build_tokenizer()
            save_model(build_student(tok, seed=0, **size), tok, path)
        out[name] = str(path)
    return out


def sync_run(config: str, overrides: list[str], buckets_mb: list[float], repeats: int) -> list[dict]:
    """Per student: MB sent, the object store's seconds per sync, and each bucket size's (median of `repeats`)."""
    import ray
    from ray.util import placement_group

    from mopd.config import load_config
    from mopd.engine_group import engine_spec
    from mopd.placement import BundlePlan, Placement
    from mopd.ray_cluster import init_ray
    from mopd.trainer_actor import RemoteTrainer
    from rollout.actors import start_student_engines

    rows = []
    for name, path in sync_students(Path(".cache/bench")).items():
        cfg = load_config(config, [f"student.path={path}", *overrides])
        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.host, log_to_driver=False)
        r, t = cfg.rollout, cfg.trainer
        plan = BundlePlan()  # the trainer's and the student engines' bundles (no teachers in this benchmark)
        plan.add("trainer", t.num_workers, t.num_cpus, t.num_gpus, "trainer")
        plan.add("student", r.num_engines, r.num_cpus_per_engine, r.num_gpus_per_engine, "rollout")
        pg = placement_group(plan.bundles)
        assert pg.wait(timeout_seconds=60), "the private cluster cannot hold the trainer and the engines"
        placement = Placement(pg, plan, 0.0)
        tr = RemoteTrainer(cfg, path, placement)
        engines = start_student_engines(
            engine_spec(cfg, path, dtype=r.dtype or cfg.student.dtype, max_model_len=64,
                        **plan.actor_resources("student")), r.num_engines, placement.strategies("student"))
        ray.get([e.ready.remote() for e in engines])
        tr.ready()
        try:
            mb = weights_mb(path, [])
            variants = [("object_store", None)] + [("collective", b) for b in buckets_mb]
            times: dict[str, list[float]] = {}
            assert tr.connect(engines), "the collective group could not be formed"
            for i in range(repeats + 1):  # the first round warms up
                for mode, bucket in variants:
                    tr.weight_sync = mode
                    if bucket is not None:
                        tr.bucket_bytes = int(bucket * 1e6)
                    t0 = time.perf_counter()
                    tr.sync(engines, version=i, full=False)
                    if i:
                        times.setdefault(f"{mode}:{bucket}", []).append(time.perf_counter() - t0)
            rows.append({"student": name, "mb": mb, "engines": len(engines),
                         **{k: statistics.median(v) for k, v in times.items()}})
        finally:
            for e in engines:
                ray.kill(e)
            tr.close()
            placement.remove()
    return rows


def print_sync_table(rows: list[dict], buckets_mb: list[float], repeats: int) -> None:
    print(f"weight sync, median of {repeats} syncs each (driver call -> every engine reloaded); "
          f"{rows[0]['engines']} engine(s)")
    head = ["student", "MB", "object_store s", "MB/s"]
    for b in buckets_mb:
        head += [f"collective {b:g} MB s", "MB/s", "ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        base = r["object_store:None"]
        cells = [r["student"], f"{r['mb']:.1f}", f"{base:.4f}", f"{r['mb'] / base:,.0f}"]
        for b in buckets_mb:
            s = r[f"collective:{b}"]
            cells += [f"{s:.4f}", f"{r['mb'] / s:,.0f}", f"{base / s:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print("(ratio: collective MB/s over object_store MB/s)")


def weights_mb(student_path: str, freeze: list[str]) -> float:
    """The student's weights as the trainer sends them, in MB (fp32; frozen ones, trainer.freeze, are not resent)."""
    import fnmatch

    from safetensors import safe_open

    numel = 0
    for f in Path(student_path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            numel += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys()
                         if not any(fnmatch.fnmatch(k, p) for p in freeze))
    return numel * 4 / 1e6


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    ap.add_argument("--vary", default="", help="KEY=V1,V2,...: one run per value, side by side")
    ap.add_argument("--sync", action="store_true", help="weight sync alone: object store vs collective")
    ap.add_argument("--buckets", default="4,32,128", help="--sync: collective bucket sizes (MB)")
    ap.add_argument("--repeats", type=int, default=5, help="--sync: timed syncs per variant")
    args, overrides = ap.parse_known_args(argv)
    if args.config and "=" in args.config:
        overrides, args.config = [args.config, *overrides], "configs/quickstart.yaml"
    if args.sync:
        buckets = [float(b) for b in args.buckets.split(",")]
        print_sync_table(sync_run(args.config, overrides, buckets, args.repeats), buckets, args.repeats)
        return
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
    if any(r["turns"] for _, r in results):
        print(f"{'env s':<16}" + "".join(f"{r['env']:>11.4f} {r['env'] / r['step']:>6.1%}" for _, r in results)
              + "   (per engine, the time it sat idle waiting for its environments; inside `rollout`)")
        for name in ("turns", "tool_calls", "obs_share"):
            print(f"{name:<16}" + "".join(f"{r[name]:>18.3f}" for _, r in results))
    sent = ", ".join(f"{r['weights_mb']:.1f}" for _, r in results)
    print(f"{'sync s per MB':<16}" + "".join(f"{r['sync'] / r['weights_mb']:>18.5f}" for _, r in results)
          + f"   (weights sent {sent} MB fp32; with max_staleness > 0 the step does not wait "
            "for the engines to apply them)")


if __name__ == "__main__":
    main(sys.argv[1:])
