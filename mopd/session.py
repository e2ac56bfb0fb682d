"""The run session: everything a run owns besides its step loop.

`RunSession` is a context manager. Entering it takes the run dir's lock (one writer per run dir: a second run
into it is refused naming this one; held until the session closes), then runs every check that can fail before
step 1 (run dir, logger
packages, model folders, data, teachers' domains and tokenizers), then starts the cluster, the trainer actor
and the engines, runs the teachers' preflight, evaluates the student (and the teachers) before training and
starts the batch pipeline. Leaving it stops all of them, whatever happened. In between it keeps the run's
schedules (evaluations, checkpoints, memory readings, the dashboard through the logger), its recovery after an
actor dies, and its `RunState`: exactly what a checkpoint's `state.json` holds, so a resumed run continues
from it. `mopd.train.train` is the loop that drives it.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer

from mopd.atomic import write_text
from mopd.carry import CARRY_FILE, carry_key, load_carry
from mopd.carry import encode as encode_carry
from mopd.checkpoint import checkpoint_problem, checkpoints_dir, complete_steps, intact_checkpoint
from mopd.config import MopdConfig, to_yaml
from mopd.data import check_domain_mix, encode_rows, load_rows
from mopd.engine_group import start_engines
from mopd.evaluate import eval_rows, evaluate, evaluate_teachers
from mopd.jsonl import read_metrics
from mopd.logger import check_logger_packages, make_run_logger
from mopd.manifest import check_teachers, teacher_manifest
from mopd.memory import run_memory
from mopd.placement import reserve
from mopd.producer import BatchProducer, Pipeline, StepBatch
from mopd.ray_cluster import cluster_address, init_ray
from mopd.report import result_table
from mopd.run_dir import clean_stale, hold_run_dir, prepare_run_dir
from mopd.run_lock import RunDirLock
from mopd.samples import domain_summary
from mopd.timing import timed
from mopd.trainer import check_freeze
from mopd.trainer_actor import RemoteTrainer
from teachers.preflight import check_model_folders, require_preflight
from teachers.registry import TeacherRegistry

# Memory of every process is read on the first step and every this many steps (a call per actor).
MEMORY_EVERY = 10
# The stages a step waits for (with the pipeline, rollout and teacher scoring run beside the step: what the
# step waits for them is wait_rollout and wait_teacher).
_STAGES = ("wait_rollout", "wait_teacher", "old_log_prob", "train", "sync")
_FAULTS = ("faults/engine_restarts", "faults/trainer_restarts", "faults/redone_steps")


@dataclass
class RunState:
    """Where the run stands: what a checkpoint's `state.json` holds (besides weights, optimizer and RNG)."""

    step: int = 0  # the last step whose record is logged
    train_s: float = 0.0  # summed step time (what trainer.max_wallclock_s and a wall-clock schedule count)
    eval_before: dict | None = None  # the evaluation before step 1 (a resumed run does not redo it)
    eval_teacher: dict | None = None  # the teachers' own accuracy on the eval prompts
    teachers: dict | None = None  # the teacher manifest (mopd.manifest): what a resume checks its teachers against

    @classmethod
    def from_checkpoint(cls, st: dict) -> RunState:
        return cls(**{f.name: st[f.name] for f in dataclasses.fields(cls) if f.name in st})

    def extra(self) -> dict:
        """The checkpoint's extra state (`save_checkpoint` writes the step itself)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "step"}


class RunSession:
    """One run's resources, schedules, recovery and state; see the module docstring."""

    def __init__(self, cfg: MopdConfig, resume: bool = False, overwrite: bool = False,
                 log: Callable[[str], None] = print, resume_from: str | None = None,
                 allow_teacher_change: bool = False) -> None:
        self.cfg, self.overwrite, self.log = cfg, overwrite, log
        self.resume, self.resume_from = resume or resume_from is not None, resume_from
        self.allow_teacher_change = allow_teacher_change
        self.t_start = time.perf_counter()
        self.run_dir = Path(cfg.logging.run_dir)
        self.state = RunState()
        self.pipeline: Pipeline | None = None
        self.trainer: Any = None
        self.engines: Any = None
        self.stop: _StopSignals | None = None
        self.lock: RunDirLock | None = None  # taken first, released last
        self.updates: list = []  # engine weight updates in flight (max_staleness > 0 does not wait for them)
        self.faults = dict.fromkeys(_FAULTS, 0)
        t = cfg.trainer
        self.by_time = t.schedule_horizon == "wallclock"  # the schedule spans the time budget; the run ends by time
        self.last_step = sys.maxsize if self.by_time else t.steps

    # -- start and stop ----------------------------------------------------------------------------
    def __enter__(self) -> RunSession:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        cfg, log = self.cfg, self.log
        self.lock = hold_run_dir(self.run_dir, self.resume, self.overwrite, log)  # before anything is written
        ck = prepare_run_dir(self.run_dir, self.resume, self.overwrite, log, self.resume_from)
        self.manifest = teacher_manifest(cfg)
        if ck is not None:
            saved = json.loads((ck / "state.json").read_text()).get("teachers")
            check_teachers(saved, self.manifest, ck.name, self.allow_teacher_change, log)
        write_text(self.run_dir / "config.yaml", to_yaml(cfg))
        # -- data, teachers, engines: every check that can fail runs before step 1 ---------------------
        check_logger_packages(cfg.logging.sinks, cfg)
        student = str(ck / "model") if ck else cfg.student.path
        check_model_folders(cfg, student_path=student if ck else None, log=log)
        check_freeze(cfg.trainer.freeze, student)  # the trainer actor would refuse it only after the cluster starts
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
        self.registry = registry = TeacherRegistry.from_config(cfg, self.tokenizer)
        rows = load_rows(cfg.data.train_files, cfg.data.dedupe, log)
        registry.group([r["domain"] for r in rows], [r["id"] for r in rows])
        check_domain_mix(rows, cfg.data.domain_mix)
        prompt_ids = encode_rows(self.tokenizer, rows, cfg.data.max_prompt_tokens, cfg.data.add_special_tokens)
        self.evals = eval_rows(cfg, log)
        registry.group([r["domain"] for r in self.evals], [r["id"] for r in self.evals])
        self.eval_ids = encode_rows(self.tokenizer, self.evals, cfg.data.max_prompt_tokens,
                                    cfg.data.add_special_tokens)

        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.host, log_to_driver=cfg.ray.log_to_driver)
        self.placement = reserve(cfg)  # every engine's and the trainer's bundle, or a clear error
        log(f"placement group ready in {self.placement.ready_s:.1f} s ({cfg.ray.placement_strategy}): "
            f"{self.placement.plan.describe()}")
        where = self.placement.where()
        if len(set(where.values())) > 1:  # several nodes: say which actor runs where
            log("placement: " + ", ".join(f"{label} on node {node[:8]}" for label, node in where.items()))
        # The trainer actor loads its model while the engines start.
        self.trainer = RemoteTrainer(cfg, student, self.placement)
        if ck is not None:
            self.state = RunState.from_checkpoint(self.trainer.load(ck))
            log(f"resumed from {ck} at step {self.state.step}")
        self.state.teachers = self.manifest  # the next checkpoints name the teachers this run uses
        self.engines = start_engines(cfg, registry, self.placement, self.trainer)
        self.stop = _StopSignals()
        self.trainer.ready()
        self.trainer.connect(self.engines.students)  # the weight-sync group, while no rollout is queued
        if ck is not None:  # the engines loaded student.path
            self.trainer.sync(self.engines.students, version=self.state.step)
        log(f"engines up in {self.engines.startup_s:.1f} s; weight sync: {self.trainer.sync_mode}")
        # The same checks as `mopd teachers check`, on the engines this run will use.
        require_preflight(cfg, self.engines.teachers, self.tokenizer, rows, log=log)
        self.logger = make_run_logger(cfg, self.run_dir, self.state.step if ck else None)
        self.producer = BatchProducer(cfg, self.engines.students, self.engines.teachers, registry, self.tokenizer,
                                      rows, prompt_ids)
        if ck is not None and self.producer.auto_mix is not None:  # the data order follows the logged teacher KL
            self.producer.auto_mix.replay(read_metrics(self.run_dir / "metrics.jsonl"), self.state.step)
        self.actors = {**self.trainer.named_actors(), **self.engines.named_actors()}
        self.private = cluster_address(cfg.ray.address) is None
        self.pids = self.engines.pids()
        self.start_step = self.saved_step = self.state.step

        s = self.state
        if s.eval_before is None:
            s.eval_before = self.evaluate()
            self.logger.log(0, _eval_metrics(s.eval_before))
        log("before: " + ", ".join(f"{d} acc {x['acc']:.2f} kl {x['teacher_kl']:.2f}"
                                   for d, x in s.eval_before.items()))
        if s.eval_teacher is None and self.producer.objective.needs_teachers:
            s.eval_teacher = evaluate_teachers(cfg, self.engines, registry, self.tokenizer, self.evals,
                                               prompt_ids=self.eval_ids)
        self._start_pipeline(self._carried(ck))

    def close(self) -> None:
        """Stop the pipeline and every actor (an error mid-run must not leave them, or the placement group, on
        a shared cluster), then release the run dir."""
        try:
            if self.pipeline is not None:
                self.pipeline.close()
            if self.stop is not None:
                self.stop.restore()
            if self.trainer is not None:
                self.trainer.close()
            if self.engines is not None:
                self.engines.shutdown()  # also removes the placement group
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _start_pipeline(self, ready: dict[int, StepBatch] | None = None) -> None:
        """Rollouts and teacher scoring of the next batches run while the trainer steps (trainer.max_staleness).
        `ready`: the batches after the current step that were sampled before it (a checkpoint's carry, or what a
        fault left intact): the pipeline serves them first, so those steps train on what they would have."""
        s = self.state.step
        if ready:
            self.log(f"continuing with the {len(ready)} batch(es) already sampled for step(s) "
                     f"{', '.join(map(str, sorted(ready)))} (trainer.max_staleness={self.cfg.trainer.max_staleness})")
        self.pipeline = Pipeline(self.producer, self.cfg.trainer.max_staleness, s + 1, s, self.last_step, ready)
        self.updates = []

    def _carried(self, ck: Path | None) -> dict[int, StepBatch]:
        """The batches checkpoint `ck` carries for the steps right after it (`mopd.carry`)."""
        if ck is None:
            return {}
        return load_carry(ck, self.cfg, self.producer.rows, self.tokenizer.pad_token_id, self.log)

    # -- the step's parts ------------------------------------------------------------------------
    def next_step(self) -> bool:
        """Whether the loop takes another step: not past the last one, the time budget or a stop signal."""
        t, s = self.cfg.trainer, self.state
        if t.max_wallclock_s and s.train_s >= t.max_wallclock_s:
            self.log(f"stopping at step {s.step}: trainer.max_wallclock_s={t.max_wallclock_s} reached")
            return False
        if self.stop is not None and self.stop.signal is not None:  # preemption or Ctrl-C: keep every finished step
            self.log(f"{self.stop.name} received: saving step {s.step} and stopping (continue with --resume)")
            return False
        return s.step < self.last_step

    def progress(self) -> float | None:
        """Where a wall-clock schedule horizon is, in [0, 1] (None: the schedule counts steps)."""
        return self.state.train_s / self.cfg.trainer.max_wallclock_s if self.by_time else None

    def sync(self, step: int, metrics: dict[str, float]) -> None:
        """Push the step's weights into the student engines; with `max_staleness` > 0 without waiting for them
        (an earlier update that failed raises here)."""
        # Not before the batch the current policy must draw whole has been drawn (Pipeline.drawn_before): a
        # multi-turn batch's later turns would otherwise meet the new weights. Time the step waited for a rollout.
        metrics["timing_s/wait_rollout"] = metrics.get("timing_s/wait_rollout", 0.0) + self.pipeline.drawn_before(step)
        with timed("sync", metrics):
            if self.updates:
                self.updates = self.trainer.check_updates(self.updates)
            self.updates += self.trainer.sync(self.engines.students, version=step,
                                              wait=self.cfg.trainer.max_staleness == 0, full=False)
        self.pipeline.weights_sent(step)

    def record(self, step: int, sb: StepBatch, metrics: dict[str, float]) -> None:
        """Log the step's record; from here on the step stands (a fault after it redoes nothing)."""
        metrics.update(sb.metrics)
        metrics.update(self.producer.mix_metrics(step))
        metrics.update(self.faults)
        self.state.train_s += metrics["timing_s/step"]
        metrics.update(_step_record(sb, metrics))
        if step == self.start_step + 1 or step % MEMORY_EVERY == 0:
            metrics.update(run_memory(self.actors, self.private))
        self.logger.log(step, metrics)
        self.state.step = step

    def after_step(self, step: int) -> None:
        """The evaluation and checkpoint schedules."""
        t = self.cfg.trainer
        if t.eval_every and step % t.eval_every == 0 and step < self.last_step:
            self.logger.log(step, _eval_metrics(self.evaluate()))
        if self._save_due(step):
            self.save()

    def save(self) -> None:
        """The trainer's checkpoint of the current step, with the batches the pipeline already sampled for the
        steps after it (`Pipeline.ahead`): a run continued from it trains on exactly those."""
        step, files = self.state.step, None
        if self.pipeline is not None and self.cfg.trainer.max_staleness > 0 and step < self.last_step:
            ahead = self.pipeline.ahead(step)
            if ahead:
                files = {CARRY_FILE: encode_carry(ahead, carry_key(self.cfg))}
            else:
                self.log(f"checkpoint step_{step}: the pipeline holds no batches after it (it failed or closed); "
                         "a resume from it resamples them (not bit-exact)")
        self.trainer.save(self.run_dir, step, self.state.extra(), files)
        self.saved_step = step

    def evaluate(self) -> dict:
        return evaluate(self.cfg, self.engines, self.registry, self.tokenizer, self.evals, prompt_ids=self.eval_ids)

    def _final_evaluation(self) -> dict:
        """The evaluation after the last step. An engine that dies during it costs no step (they all stand, the
        last one saved): wait for Ray to restart it (a student engine re-synced), count it, and evaluate again;
        the evaluation is a function of the weights and the seed, so it is the one the run would have had."""
        while True:
            try:
                return self.evaluate()
            except ray.exceptions.RayActorError as err:
                restarted, self.pids = self.engines.wait_restarted(self.pids)
                if not restarted:
                    raise  # every engine is alive (a dead trainer is not the evaluation's)
                if any(n.startswith("student") for n in restarted):
                    self.trainer.connect(self.engines.students)
                    self.trainer.sync(self.engines.students, version=self.state.step)
                self.faults["faults/engine_restarts"] += len(restarted)
                self.log(f"final evaluation: {', '.join(restarted)} died and came back ({str(err).splitlines()[0]}); "
                         "evaluating again")

    def _save_due(self, step: int) -> bool:
        every = self.cfg.trainer.save_every
        return bool(every and step % every == 0) or step == self.last_step

    # -- faults ----------------------------------------------------------------------------------
    def recover(self, err: Exception, failed_step: int) -> None:
        """An actor died during `failed_step`: wait for Ray to restart engines (and re-sync them: a restarted
        student engine holds its initial weights), then redo the steps after the last one that stands, on the
        batches they would have had. A live trainer continues when it holds exactly the recorded steps and the
        batches the next steps need (sampled by older policies, `trainer.max_staleness`) came through whole;
        otherwise, and when the trainer died, it is rebuilt from the last intact checkpoint, whose carried
        batches make the redone steps equal to the uninterrupted run's."""
        cfg, f = self.cfg, self.faults
        self.pipeline.close()
        restarted, self.pids = self.engines.wait_restarted(self.pids)
        logged = self.state.step == failed_step  # a recorded step stands (its interrupted save is redone)
        alive = self.trainer.alive()
        if alive and not restarted:
            raise err  # every actor is alive: not a fault to recover from
        done, ready = self.state.step, {}
        if alive:
            ready = self._intact_ahead(done)
        if not alive or ready is None:
            if not alive and f["faults/trainer_restarts"] >= cfg.ray.max_restarts:
                raise RuntimeError(f"the trainer actor died {f['faults/trainer_restarts'] + 1} times "
                                   f"(ray.max_restarts={cfg.ray.max_restarts}); the last checkpoint is intact: "
                                   "continue with --resume") from err
            f["faults/trainer_restarts"] += 0 if alive else 1
            ready = self._rebuild_trainer("the trainer died" if not alive else
                                          "the batches sampled ahead of it were lost")
        done = self.state.step
        f["faults/engine_restarts"] += len(restarted)
        f["faults/redone_steps"] += failed_step - done
        self.trainer.connect(self.engines.students)  # a restarted engine (or trainer) is in no weight-sync group
        self.trainer.sync(self.engines.students, version=done)
        self.log(f"step {failed_step}: {', '.join(restarted) or 'the trainer'} died and came back; continuing "
                 f"from step {done + 1} with the same data and seeds")
        self._start_pipeline(ready)
        if logged and done == failed_step and self._save_due(done) and self.saved_step != done:
            self.save()  # the save that the death interrupted

    def _intact_ahead(self, done: int) -> dict[int, StepBatch] | None:
        """The batches of steps done+1..done+k that a fault left whole (sampled by the policies the
        uninterrupted run sampled them with), or None when the live trainer cannot continue exactly: a batch
        is missing, or it already applied a step that is not recorded (its sync failed)."""
        k = self.cfg.trainer.max_staleness
        if self.trainer.version != done:
            return None
        got = self.pipeline.salvage(done)
        need = range(done + 1, min(done + k, self.last_step) + 1)
        ready = {s: got[s] for s in need if s in got and _sampled_in_time(got[s], k)}
        return ready if len(ready) == len(need) else None

    def _rebuild_trainer(self, why: str) -> dict[int, StepBatch]:
        """A new trainer from the last intact checkpoint (temporaries of a save it interrupted removed); the
        run continues from that step, on the batches the checkpoint carries (returned)."""
        cfg = self.cfg
        clean_stale(self.run_dir, self.log)
        last = self._exact_checkpoint()
        self.log(f"{why}: rebuilding the trainer from {last.name if last else cfg.student.path}")
        self.trainer.close()
        self.trainer = RemoteTrainer(cfg, str(last / "model") if last else cfg.student.path, self.placement)
        self.engines.rehost(self.trainer.actors)  # the colocated engines went with the old trainer
        st = self.trainer.load(last) if last else {}
        self.state.step, self.state.train_s = st.get("step", 0), st.get("train_s", 0.0)
        self.saved_step = self.state.step
        self.logger.close()
        self.logger = make_run_logger(cfg, self.run_dir, self.state.step)  # drops the records about to be redone
        self.actors.update(self.trainer.named_actors())
        return self._carried(last)

    def _exact_checkpoint(self) -> Path | None:
        """The newest intact checkpoint that carries the batches sampled ahead of it (one saved while the
        pipeline had already lost them cannot continue exactly: an older one can); the newest intact one when
        none does (said)."""
        if not checkpoints_dir(self.run_dir).is_dir():
            return None
        newest = intact_checkpoint(self.run_dir, self.log)
        if newest is None or self.cfg.trainer.max_staleness == 0 or (newest / CARRY_FILE).is_file():
            return newest
        step = int(newest.name.removeprefix("step_"))
        if step >= self.last_step:
            return newest  # nothing after it to carry
        for s, ck in reversed(complete_steps(checkpoints_dir(self.run_dir))):
            if s < step and (ck / CARRY_FILE).is_file() and checkpoint_problem(ck) is None:
                self.log(f"{newest.name} was saved without the batches sampled ahead of it (the fault had already "
                         f"cost them): rebuilding from {ck.name}, which has them")
                return ck
        self.log(f"no checkpoint carries the batches sampled ahead of it: rebuilding from {newest.name} "
                 "(the steps right after it resample theirs: not bit-exact)")
        return newest

    # -- the end ---------------------------------------------------------------------------------
    def finish(self) -> dict:
        """After the last step: with a stop signal, save and raise `Interrupted`; otherwise the final evaluation,
        checkpoint, result files and table."""
        s = self.state
        if self.saved_step != s.step:  # a stop signal or the wall-clock budget between checkpoints
            self.save()  # before the pipeline stops: with its batches after the step
        self.pipeline.close()
        if self.stop is not None and self.stop.signal is not None:
            self.logger.close()
            raise Interrupted(self.stop.signal)
        after = self._final_evaluation()
        self.logger.log(s.step, _eval_metrics(after))
        result = {"experiment": self.cfg.experiment, "objective": str(self.cfg.algorithm.objective),
                  "steps": s.step, "train_s": s.train_s, "total_s": time.perf_counter() - self.t_start,
                  "before": s.eval_before, "after": after, "teacher": s.eval_teacher or {}}
        write_text(self.run_dir / "result.json", json.dumps(result, indent=2))
        self.logger.close()  # also re-renders the dashboard
        table = result_table(result)
        write_text(self.run_dir / "result.md", table + "\n")
        self.log(table)
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


def _sampled_in_time(sb: StepBatch, k: int) -> bool:
    """Every student sample of batch `sb.step` was drawn by policy sb.step - 1 - k or later (a batch that a
    restarted engine sampled with its initial weights is not)."""
    versions = [x.sample.policy_version for x in sb.samples if x.sample.policy_version is not None]
    return all(v >= sb.step - 1 - k for v in versions)


def _step_record(sb: StepBatch, metrics: dict[str, float]) -> dict[str, float]:
    """Step-level figures: the unaccounted rest of the step's time (timing_s/other), throughput, lengths,
    the data digest and the verifiers' accuracy per domain."""
    b, step_s = sb.batch, metrics["timing_s/step"]
    n_tok = int(b.mask_BT.sum())
    out = {"timing_s/other": max(0.0, step_s - sum(metrics.get(f"timing_s/{s}", 0.0) for s in _STAGES)),
           "perf/tokens_per_s": n_tok / step_s, "response_length/mean": n_tok / b.size,
           "response_length/max": float(b.mask_BT.sum(1).max()), "data/batch_digest": sb.digest,
           "data/rows_digest": sb.rows_digest}
    for d, s in domain_summary(sb.samples).items():
        out[f"reward/{d}/acc"] = s["acc"]
    return out


def _eval_metrics(summary: dict) -> dict[str, float]:
    """`eval/<d>/rollout_teacher_kl`: measured on the engine's log-probs of its samples (mu), unlike
    `mopd/teacher_kl/<d>`, which is on the trainer's pi_old."""
    out = {}
    for d, s in summary.items():
        out[f"eval/{d}/acc"] = s["acc"]
        out[f"eval/{d}/rollout_teacher_kl"] = s["teacher_kl"]
    return out
