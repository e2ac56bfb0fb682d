"""The trainer as a Ray actor in its own placement-group bundle, so its CPUs/GPU are reserved like the
engines' and a submitted job's driver (on the head node) holds no model.

`TrainerWorker` runs in the actor around an unchanged `mopd.trainer.Trainer`; `RemoteTrainer` is the
driver's blocking handle with the few calls the step loop makes. Weight sync is pushed from inside the
actor: the state dict goes into the object store once and every engine pulls it from there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoTokenizer

from mopd.batch import TrainBatch
from mopd.checkpoint import load_checkpoint, save_checkpoint
from mopd.config import MopdConfig
from mopd.placement import Placement
from mopd.trainer import NonFiniteError, Trainer


class TrainerWorker:
    def __init__(self, cfg: MopdConfig, model_path: str) -> None:
        torch.set_num_threads(_threads(cfg))
        self.trainer = Trainer(cfg, model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "threads": torch.get_num_threads()}

    def step(self, batch: TrainBatch, progress: float | None = None) -> dict[str, float]:
        return self.trainer.step(batch, progress)

    def sync(self, engines: list[Any]) -> None:
        ref = ray.put(self.trainer.state_dict())
        ray.get([e.update_weights.remote(ref) for e in engines])

    def save(self, run_dir: str, step: int, extra: dict) -> str:
        return str(save_checkpoint(Path(run_dir), step, self.trainer, self.tokenizer, extra,
                                   keep=self.trainer.cfg.trainer.keep_checkpoints))

    def load(self, ck: str) -> dict:
        return load_checkpoint(Path(ck), self.trainer)


def _threads(cfg: MopdConfig) -> int:
    t = cfg.trainer
    return t.num_threads or max(1, round(t.num_cpus))


class RemoteTrainer:
    """Starts the actor without waiting (it loads the model while the engines start); the first call
    that needs it blocks."""

    def __init__(self, cfg: MopdConfig, model_path: str, placement: Placement) -> None:
        res = placement.plan.actor_resources("trainer")
        (strategy,) = placement.strategies("trainer") or [None]
        env = {"OMP_NUM_THREADS": str(_threads(cfg)), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "TOKENIZERS_PARALLELISM": "false"}
        self.actor = ray.remote(TrainerWorker).options(
            **res, scheduling_strategy=strategy, runtime_env={"env_vars": env}).remote(cfg, model_path)

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # a trainer error the user can act on keeps its own message
            if isinstance(e.cause, NonFiniteError):
                raise NonFiniteError(str(e.cause)) from None
            raise

    def ready(self) -> dict[str, Any]:
        return self._get(self.actor.ready.remote())

    def step(self, batch: TrainBatch, progress: float | None = None) -> dict[str, float]:
        return self._get(self.actor.step.remote(batch, progress))

    def sync(self, engines: list[Any]) -> None:
        """Returns when every engine holds the trainer's current weights."""
        self._get(self.actor.sync.remote(engines))

    def save(self, run_dir: Path, step: int, extra: dict) -> Path:
        return Path(self._get(self.actor.save.remote(str(run_dir), step, extra)))

    def load(self, ck: Path) -> dict:
        return self._get(self.actor.load.remote(str(ck)))

    def alive(self) -> bool:
        try:
            ray.get(self.actor.ready.remote(), timeout=120)
            return True
        except ray.exceptions.RayActorError:
            return False

    def close(self) -> None:
        ray.kill(self.actor)
