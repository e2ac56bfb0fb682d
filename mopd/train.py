"""The MOPD step loop, top to bottom.

The batch producer samples prompts, rolls out on the student engines, verifies and has each domain's
teacher score the student's tokens; the trainer recomputes pi_old, applies the train/inference
correction, builds advantages and steps; the new weights are synced into the engines in place; one
logger records the step; checkpoints and evaluations happen on their schedule.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from transformers import AutoTokenizer

from mopd.atomic import write_text
from mopd.checkpoint import latest_checkpoint
from mopd.config import MopdConfig, to_yaml
from mopd.data import check_domain_mix, encode_rows, load_rows
from mopd.engine_group import start_engines
from mopd.evaluate import eval_rows, evaluate, evaluate_teachers
from mopd.jsonl import read_metrics
from mopd.logger import check_logger_packages, make_run_logger
from mopd.memory import run_memory
from mopd.placement import reserve
from mopd.producer import BatchProducer, Pipeline, StepBatch, batch_digest
from mopd.ray_cluster import cluster_address, init_ray
from mopd.report import result_table
from mopd.run_dir import prepare_run_dir
from mopd.samples import domain_summary
from mopd.timing import timed
from mopd.trainer_actor import RemoteTrainer
from teachers.preflight import check_models, require_preflight
from teachers.registry import TeacherRegistry

__all__ = ["train", "main_train", "batch_digest"]


def train(cfg: MopdConfig, resume: bool = False, log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """One run; `resume` continues the run dir's last checkpoint, `overwrite` replaces a run already there
    (without either, a run dir that holds a run is refused: nothing is lost silently)."""
    t_start = time.perf_counter()
    run_dir = Path(cfg.logging.run_dir)
    ck = prepare_run_dir(run_dir, resume, overwrite, log)
    write_text(run_dir / "config.yaml", to_yaml(cfg))

    # -- data, teachers, engines: every check that can fail runs before step 1 ---------------------
    check_logger_packages(cfg.logging.sinks, cfg)
    check_models(cfg, student_path=str(ck / "model") if ck else None, log=log)  # folders, weights finite, top-k
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
    registry = TeacherRegistry.from_config(cfg, tokenizer)
    rows = load_rows(cfg.data.train_files)
    registry.group([r["domain"] for r in rows], [r["id"] for r in rows])
    check_domain_mix(rows, cfg.data.domain_mix)
    prompt_ids = encode_rows(tokenizer, rows, cfg.data.max_prompt_tokens, cfg.data.add_special_tokens)
    evals = eval_rows(cfg)
    registry.group([r["domain"] for r in evals], [r["id"] for r in evals])
    eval_ids = encode_rows(tokenizer, evals, cfg.data.max_prompt_tokens, cfg.data.add_special_tokens)  # refused now

    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.host, log_to_driver=cfg.ray.log_to_driver)
    placement = reserve(cfg)  # every engine's and the trainer's bundle, or a clear error
    log(f"placement group ready in {placement.ready_s:.1f} s ({cfg.ray.placement_strategy}): {placement.plan.describe()}")
    where = placement.where()
    if len(set(where.values())) > 1:  # several nodes: say which actor runs where
        log("placement: " + ", ".join(f"{label} on node {node[:8]}" for label, node in where.items()))
    trainer = RemoteTrainer(cfg, str(ck / "model") if ck else cfg.student.path, placement)  # an actor in its bundle
    state: dict = trainer.load(ck) if ck is not None else {}
    if ck is not None:
        log(f"resumed from {ck} at step {state['step']}")
    engines = start_engines(cfg, registry, placement)
    stop = _StopSignals()
    pipeline: Pipeline | None = None
    try:
        trainer.ready()
        if ck is not None:
            trainer.sync(engines.students, version=state["step"])
        log(f"engines up in {engines.startup_s:.1f} s")
        # The same checks as `mopd teachers check`, on the engines this run will use.
        require_preflight(cfg, engines.teachers, tokenizer, rows, log=log)
        start_step = state.get("step", 0)
        logger = make_run_logger(cfg, run_dir, start_step if ck else None)
        producer = BatchProducer(cfg, engines.students, engines.teachers, registry, tokenizer, rows, prompt_ids)
        if ck is not None and producer.auto_mix is not None:  # the data order depends on the logged teacher KL
            producer.auto_mix.replay(read_metrics(run_dir / "metrics.jsonl"), start_step)
        actors = {**trainer.named_actors(), **engines.named_actors()}
        private = cluster_address(cfg.ray.address) is None

        before = state.get("eval_before")
        if before is None:
            before = evaluate(cfg, engines, registry, tokenizer, evals, prompt_ids=eval_ids)
            logger.log(0, _eval_metrics(before))
        log("before: " + _eval_line(before))
        teacher_acc = state.get("eval_teacher")
        if teacher_acc is None and (producer.objective.needs_teacher_scores or producer.objective.teacher_samples):
            teacher_acc = evaluate_teachers(cfg, engines, registry, tokenizer, evals, prompt_ids=eval_ids)

        t = cfg.trainer
        step, train_s, saved_step = start_step, state.get("train_s", 0.0), start_step
        by_time = t.schedule_horizon == "wallclock"  # the schedule spans the time budget; the run ends by time
        last_step = sys.maxsize if by_time else t.steps

        def save_due(s: int) -> bool:
            return bool(t.save_every and s % t.save_every == 0) or s == last_step

        def extra() -> dict:
            return {"eval_before": before, "eval_teacher": teacher_acc, "train_s": train_s}

        faults = dict.fromkeys(("faults/engine_restarts", "faults/trainer_restarts", "faults/redone_steps"), 0)
        pids = engines.pids()

        def recover(err: Exception, failed_step: int, logged: bool) -> int:
            """An actor died during `failed_step`: wait for Ray to restart engines (and re-sync them: a restarted
            student engine holds its initial weights), or rebuild a dead trainer from the last checkpoint.
            Returns the last step that stands; the loop redoes the rest from the same inputs and seeds."""
            nonlocal trainer, logger, train_s, saved_step, pids
            restarted, pids = engines.wait_restarted(pids)
            done = failed_step if logged else failed_step - 1  # a recorded step stands (its save is redone)
            if not trainer.alive():
                if faults["faults/trainer_restarts"] >= cfg.ray.max_restarts:
                    raise RuntimeError(f"the trainer actor died {faults['faults/trainer_restarts'] + 1} times "
                                       f"(ray.max_restarts={cfg.ray.max_restarts}); the last checkpoint is intact: "
                                       "continue with --resume") from err
                faults["faults/trainer_restarts"] += 1
                trainer.close()
                last = latest_checkpoint(run_dir)
                trainer = RemoteTrainer(cfg, str(last / "model") if last else cfg.student.path, placement)
                st = trainer.load(last) if last else {}
                done, train_s, saved_step = st.get("step", 0), st.get("train_s", 0.0), st.get("step", 0)
                logger.close()
                logger = make_run_logger(cfg, run_dir, done)  # drops the records of steps about to be redone
                actors.update(trainer.named_actors())
            elif not restarted:
                raise err  # every actor is alive: not a fault to recover from
            faults["faults/engine_restarts"] += len(restarted)
            faults["faults/redone_steps"] += failed_step - done
            trainer.sync(engines.students, version=done)
            if logged and done == failed_step and save_due(done):
                trainer.save(run_dir, done, extra())  # the save that the death interrupted
                saved_step = done
            log(f"step {failed_step}: {', '.join(restarted) or 'the trainer'} died and came back; continuing "
                f"from step {done + 1} with the same data and seeds")
            return done

        # Rollouts and teacher scoring of the next batches run while the trainer steps (trainer.max_staleness).
        pipeline = Pipeline(producer, t.max_staleness, step + 1, step, last_step)
        updates: list = []  # engine weight updates in flight (max_staleness > 0 does not wait for them)
        while step < last_step:
            if t.max_wallclock_s and train_s >= t.max_wallclock_s:
                log(f"stopping at step {step}: trainer.max_wallclock_s={t.max_wallclock_s} reached")
                break
            if stop.signal is not None:  # preemption or Ctrl-C: keep every finished step, then leave
                log(f"{stop.name} received: saving step {step} and stopping (continue with --resume)")
                break
            step += 1
            metrics: dict[str, float] = {}
            logged = False
            try:
                with timed("step", metrics):
                    sb = pipeline.get(step, metrics)
                    metrics.update(sb.metrics)
                    metrics.update(trainer.step(sb.batch, train_s / t.max_wallclock_s if by_time else None))
                    producer.observe(step, metrics)  # before the sync: it lets batch step + 1 + k launch
                    metrics.update(producer.mix_metrics(step))
                    with timed("sync", metrics):
                        if updates:  # the engines' earlier updates that are done: a failed one raises here
                            ready, updates = ray.wait(updates, num_returns=len(updates), timeout=0)
                            ray.get(ready)
                        updates += trainer.sync(engines.students, version=step, wait=t.max_staleness == 0,
                                                full=False)
                    pipeline.weights_sent(step)
                metrics.update(faults)
                train_s += metrics["timing_s/step"]
                metrics.update(_step_record(sb, metrics))
                if step == start_step + 1 or step % MEMORY_EVERY == 0:
                    metrics.update(run_memory(actors, private))
                logger.log(step, metrics)
                logged = True
                if t.eval_every and step % t.eval_every == 0 and step < last_step:
                    logger.log(step, _eval_metrics(evaluate(cfg, engines, registry, tokenizer, evals, prompt_ids=eval_ids)))
                if save_due(step):
                    trainer.save(run_dir, step, extra())
                    saved_step = step
            except ray.exceptions.RayActorError as e:  # an engine or the trainer died during the step
                pipeline.close()
                step = recover(e, step, logged)
                pipeline, updates = Pipeline(producer, t.max_staleness, step + 1, step, last_step), []
                continue
        pipeline.close()

        if stop.signal is not None:
            if saved_step != step:
                trainer.save(run_dir, step, extra())
            logger.close()
            raise Interrupted(stop.signal)
        after = evaluate(cfg, engines, registry, tokenizer, evals, prompt_ids=eval_ids)
        logger.log(step, _eval_metrics(after))
        if saved_step != step:  # stopped by the wall-clock budget between checkpoints
            trainer.save(run_dir, step, extra())
        result = {"experiment": cfg.experiment, "objective": str(cfg.algorithm.objective), "steps": step,
                  "train_s": train_s, "total_s": time.perf_counter() - t_start, "before": before, "after": after,
                  "teacher": teacher_acc or {}}
        write_text(run_dir / "result.json", json.dumps(result, indent=2))
        logger.close()  # also re-renders the dashboard
        table = result_table(result)
        write_text(run_dir / "result.md", table + "\n")
        log(table)
    finally:  # an error mid-run must not leave actors or the placement group on a shared cluster
        if pipeline is not None:
            pipeline.close()
        stop.restore()
        trainer.close()
        engines.shutdown()  # also removes the placement group
    return result


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped the run after its last finished step was checkpointed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """SIGTERM (preemption, `ray job stop`) and SIGINT (Ctrl-C) only set a flag: the loop finishes the step
    it is in, saves it and stops, so a preempted job loses nothing and continues with `--resume`. A second
    signal of the same kind gets the default behaviour (stop now)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signal == signum:
            self.restore()
            signal.raise_signal(signum)
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# Memory of every process is read on the first step and every this many steps (a call per actor).
MEMORY_EVERY = 10
# The stages a step waits for (with the pipeline, rollout and teacher scoring run beside the step: what the
# step waits for them is wait_rollout and wait_teacher).
_STAGES = ("wait_rollout", "wait_teacher", "old_log_prob", "train", "sync")


def _step_record(sb: StepBatch, metrics: dict[str, float]) -> dict[str, float]:
    """Step-level figures: the unaccounted rest of the step's time (timing_s/other), throughput, lengths,
    the data digest and the verifiers' accuracy per domain."""
    b, step_s = sb.batch, metrics["timing_s/step"]
    n_tok = int(b.mask_BT.sum())
    out = {"timing_s/other": max(0.0, step_s - sum(metrics.get(f"timing_s/{s}", 0.0) for s in _STAGES)),
           "perf/tokens_per_s": n_tok / step_s, "response_length/mean": n_tok / b.size,
           "response_length/max": float(b.mask_BT.sum(1).max()), "data/batch_digest": sb.digest}
    for d, s in domain_summary(sb.samples).items():
        out[f"reward/{d}/acc"] = s["acc"]
    return out


def _eval_metrics(summary: dict) -> dict[str, float]:
    out = {}
    for d, s in summary.items():
        out[f"eval/{d}/acc"] = s["acc"]
        out[f"eval/{d}/teacher_kl"] = s["teacher_kl"]
    return out


def _eval_line(summary: dict) -> str:
    return ", ".join(f"{d} acc {s['acc']:.2f} kl {s['teacher_kl']:.2f}" for d, s in summary.items())


def main_train(cfg: MopdConfig, resume: bool, overwrite: bool = False) -> int:
    """`mopd train`: 0 when the run finished, or when SIGTERM stopped it after saving (a preemption is not a
    failure); 130 after Ctrl-C."""
    torch.set_num_threads(max(1, cfg.ray.num_cpus))
    try:
        train(cfg, resume=resume, overwrite=overwrite)
    except Interrupted as e:
        print(f"mopd: stopped by {e}; the last finished step is checkpointed: continue with --resume",
              file=sys.stderr)
        return 0 if e.signum == signal.SIGTERM else 130
    return 0
