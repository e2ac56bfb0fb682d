"""The trainer as Ray actors, each in its own placement-group bundle, so their CPUs/GPUs are reserved like the
engines' and a submitted job's driver (on the head node) holds no model.

`TrainerWorker` runs in each actor around an unchanged `mopd.trainer.Trainer`; `RemoteTrainer` is the driver's
blocking handle with the few calls the step loop makes. With `trainer.num_workers` = N > 1 the N actors form one
`torch.distributed` group (gloo on CPU, NCCL on GPU; rank 0 picks the rendezvous address on its node), each
trains on its share of every batch and the gradients are averaged. Weight sync is pushed from rank 0 (every
rank takes part in the gather under ZeRO-3): the state dict goes into the object store once and every engine
pulls it from there; the driver submits the engines' updates, ordered with its rollouts. Checkpoints are written by rank 0 and hold whole weights and optimizer state, so a run can
resume with a different worker count; they must be on storage every worker's node sees.
"""

from __future__ import annotations

import os
import socket
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
    """Construction is light (the rendezvous address must be known before any rank builds its trainer);
    `build` loads the model and joins the group."""

    def __init__(self, cfg: MopdConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(_threads(cfg))

    def address(self) -> tuple[str, int]:
        """Rank 0's rendezvous address: this node's IP (the one Ray uses: loopback on a private cluster) and a
        free port on it."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((host, 0))
            return host, sock.getsockname()[1]

    def build(self, model_path: str, rank: int = 0, world: int = 1, master: tuple[str, int] | None = None) -> None:
        if world > 1:
            assert master is not None
            # Ray gives each actor only its own GPU(s), so the local device index is always 0.
            os.environ.update({"MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]), "RANK": str(rank),
                               "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        self.rank = rank
        self.trainer = Trainer(self.cfg, model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.student.path)

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "threads": torch.get_num_threads()}

    def step(self, batch: TrainBatch, progress: float | None = None) -> dict[str, float]:
        return self.trainer.step(batch, progress)

    def publish(self, full: bool = True) -> list[Any]:
        """Rank 0: the weights, put in the object store once (a one-item list: the reference itself, for the
        driver to hand to the engines); `full=False` leaves out the frozen ones (`trainer.freeze`), which the
        engines already hold. Under ZeRO-3 every rank takes part in the gather."""
        if self.rank != 0 and not self.trainer.gathers:
            return []
        sd = self.trainer.state_dict(trained_only=not full)
        return [ray.put(sd)] if self.rank == 0 else []

    def save(self, run_dir: str, step: int, extra: dict) -> str:
        state = self.trainer.checkpoint_state()  # every rank: a collective under DeepSpeed
        if self.rank != 0:
            return ""
        return str(save_checkpoint(Path(run_dir), step, self.trainer, self.tokenizer, extra,
                                   keep=self.trainer.cfg.trainer.keep_checkpoints, state=state))

    def load(self, ck: str) -> dict:
        return load_checkpoint(Path(ck), self.trainer)

    def weights(self) -> dict[str, torch.Tensor]:
        """Whole fp32 weights (a collective under ZeRO-3), e.g. to compare workers in tests."""
        return self.trainer.state_dict()


def _threads(cfg: MopdConfig) -> int:
    t = cfg.trainer
    return t.num_threads or max(1, round(t.num_cpus))


class RemoteTrainer:
    """Starts the actors without waiting (they load the model while the engines start); the first call that
    needs them blocks. Every call goes to every worker; rank 0 answers."""

    def __init__(self, cfg: MopdConfig, model_path: str, placement: Placement) -> None:
        res = placement.plan.actor_resources("trainer")
        env = {"OMP_NUM_THREADS": str(_threads(cfg)), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "TOKENIZERS_PARALLELISM": "false"}
        self.actors = [ray.remote(TrainerWorker).options(**res, scheduling_strategy=strategy,
                                                         runtime_env={"env_vars": env}).remote(cfg)
                       for strategy in placement.strategies("trainer") or []]
        world = len(self.actors)
        master = self._get(self.actors[0].address.remote()) if world > 1 else None
        # Queued: later calls wait behind them; the first call also waits for these, so a failed build
        # surfaces with its own error.
        self._building = [a.build.remote(model_path, rank, world, master) for rank, a in enumerate(self.actors)]

    @property
    def actor(self) -> Any:
        """Rank 0."""
        return self.actors[0]

    def named_actors(self) -> dict[str, Any]:
        if len(self.actors) == 1:
            return {"trainer": self.actors[0]}
        return {f"trainer[{i}]": a for i, a in enumerate(self.actors)}

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # a trainer error the user can act on keeps its own message
            if isinstance(e.cause, NonFiniteError):
                raise NonFiniteError(str(e.cause)) from None
            raise

    def _all(self, refs: list[Any]) -> Any:
        """Rank 0's answer once every worker has answered; the first failure is raised at once (the other
        workers may be waiting on it in a collective)."""
        pending, self._building = [*self._building, *refs], []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            self._get(done[0])
        return self._get(refs[0])

    def ready(self) -> dict[str, Any]:
        return self._all([a.ready.remote() for a in self.actors])

    def step(self, batch: TrainBatch, progress: float | None = None) -> dict[str, float]:
        ref = ray.put(batch) if len(self.actors) > 1 else batch  # one copy in the object store for all workers
        return self._all([a.step.remote(ref, progress) for a in self.actors])

    def sync(self, engines: list[Any], version: int | None = None, wait: bool = True, full: bool = True) -> list[Any]:
        """Send the trainer's current weights (policy `version`, stamped on the samples generated with them) to
        every engine. The driver submits the engines' updates, so they are ordered with its own generate calls
        (a rollout submitted afterwards samples with these weights). `wait`: return when every engine holds
        them; otherwise return the updates' references at once (the engines apply them between requests).
        `full=False`: only the trained tensors, for engines that already hold this run's frozen ones (not a
        restarted engine, not after a resume: those loaded `student.path`)."""
        [ref] = self._all([a.publish.remote(full) for a in self.actors])
        updates = [e.update_weights.remote(ref, version) for e in engines]
        if wait:
            ray.get(updates)
        return updates

    def save(self, run_dir: Path, step: int, extra: dict) -> Path:
        return Path(self._all([a.save.remote(str(run_dir), step, extra) for a in self.actors]))

    def load(self, ck: Path) -> dict:
        return self._all([a.load.remote(str(ck)) for a in self.actors])

    def weights(self) -> list[dict[str, torch.Tensor]]:
        """Every worker's whole weights (tests: data-parallel replicas must agree)."""
        refs = [a.weights.remote() for a in self.actors]
        self._all(refs)
        return [self._get(r) for r in refs]

    def alive(self) -> bool:
        """Every worker answers; a dead one, or one stuck in a collective with a dead peer, means the group
        must be rebuilt."""
        refs = [a.ready.remote() for a in self.actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=120)
        try:
            ray.get(done)
        except ray.exceptions.RayActorError:
            return False
        return not pending

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
