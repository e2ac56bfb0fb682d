"""The MOPD step loop, top to bottom.

sample prompts -> student engines roll out -> each domain's teacher scores the student's tokens ->
advantages + train/inference correction -> optimizer step -> weights synced into the engines in place
-> metrics, checkpoints, evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mopd.atomic import write_text
from mopd.batch import build_batch
from mopd.checkpoint import latest_checkpoint
from mopd.config import MopdConfig, to_yaml
from mopd.data import DomainMixSampler, encode_rows, load_rows
from mopd.engines import start_engines
from mopd.evaluate import eval_rows, evaluate
from mopd.loggers import check_logger_packages
from mopd.metrics import make_sinks
from mopd.placement import reserve
from mopd.quickstart import prepare_world
from mopd.ray_cluster import init_ray
from mopd.report import result_table
from mopd.round import domain_summary, rollout, score_with_teachers, teacher_rollout, verify_samples
from mopd.trainer_actor import RemoteTrainer
from stability.dashboard import render_dashboard
from teachers.preflight import require_preflight
from teachers.registry import TeacherRegistry


def train(cfg: MopdConfig, resume: bool = False, log=print) -> dict:
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    run_dir = Path(cfg.logging.run_dir)
    ck = latest_checkpoint(run_dir) if resume else None
    if resume and ck is None:
        log(f"no checkpoint under {run_dir}/checkpoints; starting from step 0")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", to_yaml(cfg))

    # -- data, teachers, engines: every check that can fail runs before step 1 ---------------------
    check_logger_packages(cfg.logging.sinks, cfg)
    prepare_world(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
    registry = TeacherRegistry.from_config(cfg, tokenizer)
    rows = load_rows(cfg.data.train_files)
    registry.group([r["domain"] for r in rows], [r["id"] for r in rows])
    prompt_ids = encode_rows(tokenizer, rows, cfg.data.max_prompt_tokens)
    sampler = DomainMixSampler(rows, cfg.data.domain_mix, cfg.trainer.seed)
    evals = eval_rows(cfg)

    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.host, log_to_driver=cfg.ray.log_to_driver)
    placement = reserve(cfg)  # every engine's and the trainer's bundle, or a clear error
    log(f"placement group ready in {placement.ready_s:.1f} s ({cfg.ray.placement_strategy}): {placement.plan.describe()}")
    trainer = RemoteTrainer(cfg, str(ck / "model") if ck else cfg.student.path, placement)  # an actor in its bundle
    start_step = 0
    state: dict = {}
    if ck is not None:
        state = trainer.load(ck)
        start_step = state["step"]
        log(f"resumed from {ck} at step {start_step}")
    engines = start_engines(cfg, registry, placement)
    try:
        trainer.ready()
        if ck is not None:
            trainer.sync(engines.students)
        log(f"engines up in {engines.startup_s:.1f} s")
        # The same checks as `mopd teachers check`, on the engines this run will use.
        require_preflight(cfg, engines.teachers, tokenizer, rows, log=log)
        sinks = make_sinks(cfg.logging.sinks, run_dir, start_step if ck else None, cfg)

        def record(step: int, metrics: dict) -> None:
            for s in sinks:
                s.log(step, metrics)

        before = state.get("eval_before")
        if before is None:
            before = evaluate(cfg, engines, registry, tokenizer, evals)
            record(0, _eval_metrics(before))
        log("before: " + _eval_line(before))

        a, r, t = cfg.algorithm, cfg.rollout, cfg.trainer
        need_teacher = a.objective not in ("orm", "sft")
        bar = _progress(cfg, start_step)
        step = start_step
        train_s = state.get("train_s", 0.0)
        saved_step = start_step
        while step < t.steps:
            if t.max_wallclock_s and train_s >= t.max_wallclock_s:
                log(f"stopping at step {step}: trainer.max_wallclock_s={t.max_wallclock_s} reached")
                break
            t0 = time.perf_counter()
            idx = sampler.batch(step, t.prompts_per_step)
            batch_ids, batch_rows = [prompt_ids[i] for i in idx], [rows[i] for i in idx]
            seed = t.seed * 1_000_003 + step * 10_007
            if a.objective == "sft":  # baseline: the teachers generate, the student imitates off-policy
                samples = teacher_rollout(engines.teachers, registry, batch_ids, batch_rows, n=r.n,
                                          temperature=r.temperature, max_tokens=r.max_tokens, seed=seed)
            else:
                samples = rollout(engines.students, batch_ids, batch_rows, n=r.n, temperature=r.temperature,
                                  top_p=r.top_p, max_tokens=r.max_tokens, seed=seed)
            t_roll = time.perf_counter() - t0
            verify_samples(samples, tokenizer)
            t1 = time.perf_counter()
            if need_teacher:
                score_with_teachers(engines.teachers, registry, samples, top_k=a.teacher_top_k)
            t_teacher = time.perf_counter() - t1
            batch = build_batch(samples, tokenizer.pad_token_id)
            metrics = trainer.step(batch)
            t_sync = trainer.sync(engines.students)
            step += 1
            step_s = time.perf_counter() - t0
            train_s += step_s
            n_tok = int(batch.mask_BT.sum())
            metrics.update({
                "timing_s/rollout": t_roll, "timing_s/teacher": t_teacher, "timing_s/sync": t_sync,
                "timing_s/step": step_s, "perf/tokens_per_s": n_tok / step_s, "perf/peak_rss_gb": _peak_rss_gb(),
                "response_length/mean": n_tok / batch.size,
                "response_length/max": float(batch.mask_BT.sum(1).max()),
            })
            metrics["data/batch_digest"] = batch_digest([rows[i]["id"] for i in idx])
            for d, s in domain_summary(samples).items():
                metrics[f"reward/{d}/acc"] = s["acc"]
            record(step, metrics)
            bar.update(step, metrics)
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                record(step, _eval_metrics(evaluate(cfg, engines, registry, tokenizer, evals)))
            if cfg.logging.dashboard_every and step % cfg.logging.dashboard_every == 0:
                render_dashboard([run_dir], run_dir / "dashboard.html")
            if (t.save_every and step % t.save_every == 0) or step == t.steps:
                trainer.save(run_dir, step, {"eval_before": before, "train_s": train_s})
                saved_step = step
        bar.close()

        after = evaluate(cfg, engines, registry, tokenizer, evals)
        record(step, _eval_metrics(after))
        if saved_step != step:  # stopped by the wall-clock budget between checkpoints
            trainer.save(run_dir, step, {"eval_before": before, "train_s": train_s})
        teachers_acc = _teacher_accuracy(cfg)
        result = {"experiment": cfg.experiment, "objective": a.objective, "steps": step, "train_s": train_s,
                  "total_s": time.perf_counter() - t_start, "before": before, "after": after, "teacher": teachers_acc}
        write_text(run_dir / "result.json", json.dumps(result, indent=2))
        render_dashboard([run_dir], run_dir / "dashboard.html")
        table = result_table(result)
        write_text(run_dir / "result.md", table + "\n")
        log(table)
        for s in sinks:
            s.close()
    finally:  # an error mid-run must not leave actors or the placement group on a shared cluster
        trainer.close()
        engines.shutdown()  # also removes the placement group
    return result


def batch_digest(row_ids: list[str]) -> int:
    """A short fingerprint of a step's prompts, so resumed runs can be checked for the same data order."""
    import hashlib

    return int(hashlib.sha256(",".join(row_ids).encode()).hexdigest()[:12], 16)


def _eval_metrics(summary: dict) -> dict[str, float]:
    out = {}
    for d, s in summary.items():
        out[f"eval/{d}/acc"] = s["acc"]
        out[f"eval/{d}/teacher_kl"] = s["teacher_kl"]
    return out


def _eval_line(summary: dict) -> str:
    return ", ".join(f"{d} acc {s['acc']:.2f} kl {s['teacher_kl']:.2f}" for d, s in summary.items())


def _teacher_accuracy(cfg: MopdConfig) -> dict[str, float]:
    """Each domain's own teacher accuracy, from the world's build record when this is the quickstart world."""
    p = Path(cfg.world.dir) / "world.json"
    if not p.exists():
        return {}
    acc = json.loads(p.read_text()).get("accuracy", {})
    return {k.split("/", 1)[1]: v[k.split("/", 1)[1]] for k, v in acc.items() if k.startswith("teacher/")}


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class _progress:
    def __init__(self, cfg: MopdConfig, start: int) -> None:
        self.bar = None
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.trainer.steps, initial=start, desc="mopd", dynamic_ncols=True)

    def update(self, step: int, m: dict) -> None:
        if self.bar is None:
            return
        acc = " ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in m.items() if k.startswith("reward/") and v == v)
        self.bar.set_postfix_str(f"kl={m.get('mopd/teacher_kl', float('nan')):.3f} {acc}")
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main_train(cfg: MopdConfig, resume: bool) -> int:
    torch.set_num_threads(max(1, cfg.ray.num_cpus))
    train(cfg, resume=resume)
    return 0
