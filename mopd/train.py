"""The MOPD step loop, top to bottom.

Each step: the batch producer's next batch (prompts sampled, rolled out on the student engines, verified and
scored by each domain's teacher; with `trainer.max_staleness` k it was produced while earlier steps trained),
one trainer update (pi_old, the train/inference correction, advantages, the optimizer step), the new weights
pushed into the engines, one record logged, then the evaluation and checkpoint schedules. Everything else the
run owns (the cluster, the actors, the schedules, recovery after a fault, its state) is `mopd.session.RunSession`.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import ray
import torch

from mopd.config import MopdConfig
from mopd.producer import batch_digest, rows_digest
from mopd.session import Interrupted, RunSession
from mopd.timing import timed

__all__ = ["train", "main_train", "batch_digest", "rows_digest", "Interrupted"]


def train(cfg: MopdConfig, resume: bool = False, log: Callable[[str], None] = print, overwrite: bool = False,
          resume_from: str | None = None, allow_teacher_change: bool = False) -> dict:
    """One run; `resume` continues the run dir's last intact checkpoint (`resume_from`: that one, step_N),
    `overwrite` replaces a run already there (without either, a run dir that holds a run is refused: nothing
    is lost silently). A resume refuses teachers other than the checkpoint's unless `allow_teacher_change`."""
    with RunSession(cfg, resume, overwrite, log, resume_from, allow_teacher_change) as run:
        while run.next_step():
            step, metrics = run.state.step + 1, {}
            try:
                with timed("step", metrics):
                    sb = run.pipeline.get(step, metrics)
                    metrics.update(run.trainer.step(sb.batch, run.progress()))
                    run.producer.observe(step, metrics)  # before the sync: it lets batch step + 1 + k launch
                    run.sync(step, metrics)
                run.record(step, sb, metrics)
                run.after_step(step)
            except ray.exceptions.RayActorError as e:  # an engine or the trainer died during the step
                run.recover(e, step)
        return run.finish()


def main_train(cfg: MopdConfig, resume: bool, overwrite: bool = False, resume_from: str | None = None,
               allow_teacher_change: bool = False) -> int:
    """`mopd train`: 0 when the run finished, or when SIGTERM stopped it after saving (a preemption is not a
    failure); 130 after Ctrl-C."""
    torch.set_num_threads(max(1, cfg.ray.num_cpus))
    try:
        train(cfg, resume=resume, overwrite=overwrite, resume_from=resume_from,
              allow_teacher_change=allow_teacher_change)
    except Interrupted as e:
        print(f"mopd: stopped by {e}; the last finished step is checkpointed: continue with --resume",
              file=sys.stderr)
        return 0 if e.signum == signal.SIGTERM else 130
    return 0
