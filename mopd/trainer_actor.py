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

from mopd.batch import TrainBatch
from mopd.config import MopdConfig
from mopd.placement import Placement


class TrainerWorker:
    def __init__(self, cfg: MopdConfig, model_path: str) -> None:
        import torch
        from transformers import AutoTokenizer

        from mopd.trainer import Trainer

        torch.set_num_threads(_threads(cfg))
        self.trainer = Trainer(cfg, model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)

    def ready(self) -> dict[str, Any]:
        import torch

        return {"pid": os.getpid(), "threads": torch.get_num_threads()}

    def step(self, batch: TrainBatch) -> dict[str, float]:
        return self.trainer.step(batch)

    def sync(self, engines: list[Any]) -> None:
        import ray

        ref = ray.put(self.trainer.state_dict())
        ray.get([e.update_weights.remote(ref) for e in engines])

    def save(self, run_dir: str, step: int, extra: dict) -> str:
        from mopd.checkpoint import save_checkpoint

        return str(save_checkpoint(Path(run_dir), step, self.trainer, self.tokenizer, extra))

    def load(self, ck: str) -> dict:
        from mopd.checkpoint import load_checkpoint

        return load_checkpoint(Path(ck), self.trainer)


def _threads(cfg: MopdConfig) -> int:
    t = cfg.trainer
    return t.num_threads or max(1, round(t.num_cpus))


class RemoteTrainer:
    """Starts the actor without waiting (it loads the model while the engines start); the first call
    that needs it blocks."""

    def __init__(self, cfg: MopdConfig, model_path: str, placement: Placement) -> None:
        import ray

        res = placement.plan.actor_resources("trainer")
        (strategy,) = placement.strategies("trainer") or [None]
        env = {"OMP_NUM_THREADS": str(_threads(cfg)), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "TOKENIZERS_PARALLELISM": "false"}
        self.actor = ray.remote(TrainerWorker).options(
            **res, scheduling_strategy=strategy, runtime_env={"env_vars": env}).remote(cfg, model_path)

    def _get(self, ref: Any) -> Any:
        import ray

        from mopd.trainer import NonFiniteError

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # a trainer error the user can act on keeps its own message
            if isinstance(e.cause, NonFiniteError):
                raise NonFiniteError(str(e.cause)) from None
            raise

    def ready(self) -> dict[str, Any]:
        return self._get(self.actor.ready.remote())

    def step(self, batch: TrainBatch) -> dict[str, float]:
        return self._get(self.actor.step.remote(batch))

    def sync(self, engines: list[Any]) -> float:
        """Seconds from the driver's call until every engine holds the new weights."""
        import time

        t0 = time.perf_counter()
        self._get(self.actor.sync.remote(engines))
        return time.perf_counter() - t0

    def save(self, run_dir: Path, step: int, extra: dict) -> Path:
        return Path(self._get(self.actor.save.remote(str(run_dir), step, extra)))

    def load(self, ck: Path) -> dict:
        return self._get(self.actor.load.remote(str(ck)))

    def close(self) -> None:
        import ray

        ray.kill(self.actor)
