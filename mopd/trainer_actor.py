"""The trainer as Ray actors, each in its own placement-group bundle, so their CPUs/GPUs are reserved like the
engines' and a submitted job's driver (on the head node) holds no model.

`TrainerWorker` runs in each actor around an unchanged `mopd.trainer.Trainer`; `RemoteTrainer` is the driver's
blocking handle with the few calls the step loop makes. With `trainer.num_workers` = N > 1 the N actors form one
`torch.distributed` group (gloo on CPU, NCCL on GPU; rank 0 picks the rendezvous address on its node), each
trains on its share of every batch and the gradients are averaged.

Weight sync is pushed from rank 0 (every rank takes part in the gather under ZeRO-3), by `rollout.weight_sync`:
`collective` (the default) broadcasts the weights bucket by bucket in a second `torch.distributed` group that
only rank 0 and the student engines join (`rollout/weight_group.py`: its own store and port, apart from the
data-parallel group); `object_store` puts the state dict into Ray's object store once and every engine pulls
it. Either way the driver submits the engines' side of each update, so it is ordered with its rollouts; the
collective falls back to the object store, with a warning, if its group cannot be formed.

Checkpoints are written by rank 0 and hold whole weights and optimizer state, so a run can resume with a
different worker count; they must be on storage every worker's node sees.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoTokenizer

from mopd.batch import TrainBatch
from mopd.checkpoint import load_checkpoint, save_checkpoint
from mopd.config import MopdConfig
from mopd.engine_group import max_model_len, student_spec
from mopd.placement import Placement, colocated_teachers
from mopd.trainer import NonFiniteError, Trainer
from rollout.vllm_engine import StudentEngine
from rollout.vllm_env import vllm_env
from rollout.weight_group import WeightGroup, node_ip, open_store
from teachers.hf_teacher import HfTeacherGroup

# A sync's calls still running when one of them failed: how long to wait for them before raising (a dead
# engine's peers fail within moments, as the group's connections close).
_SETTLE_S = 60.0


class TrainerWorker:
    """Construction is light (the rendezvous address must be known before any rank builds its trainer);
    `build` loads the model and joins the group."""

    def __init__(self, cfg: MopdConfig) -> None:
        self.cfg = cfg
        self.weight_group: WeightGroup | None = None  # rank 0, rollout.weight_sync=collective
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
        # Colocated engines come after the trainer: vLLM forms its own one-process world, which must not be
        # taken for the trainer's data-parallel group.
        self.engine = self.teachers = None
        threads = torch.get_num_threads()
        if self.cfg.rollout.colocate:
            spec = student_spec(self.cfg, model_path, {})
            self.engine = StudentEngine(spec.model_path, **{**spec.engine_kwargs(), "seed": spec.seed + rank},
                                        capture_routing=spec.capture_routing)
        hosted = colocated_teachers(self.cfg) if rank == 0 else []
        if hosted:
            mml = max_model_len(self.cfg)
            self.teachers = HfTeacherGroup({n: {"model_path": self.cfg.teachers[n].path, "max_model_len": mml,
                                                "dtype": str(self.cfg.teachers[n].dtype), "seed": self.cfg.trainer.seed}
                                            for n in hosted}, num_threads=threads)
        torch.set_num_threads(threads)  # what the engines' start-up may have changed

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "threads": torch.get_num_threads()}

    # -- the colocated student engine (rollout.colocate): the engine calls the batch producer makes -----------
    def engine_ready(self) -> dict[str, Any]:
        return self._engine().ready()

    def generate(self, prompt_ids: list[list[int]], **kw: Any) -> Any:
        return self._engine().generate(prompt_ids, **kw)

    def generate_turns(self, prompt_ids: list[list[int]], **kw: Any) -> Any:
        return self._engine().generate_turns(prompt_ids, **kw)

    def sync_engine(self, version: int | None = None, full: bool = True) -> float:
        """The new weights into this actor's own engine: an in-process copy, no object store, no group."""
        return self._engine().update_weights(self.trainer.state_dict(trained_only=not full), version)

    def _engine(self) -> Any:
        if self.engine is None:
            raise RuntimeError("this trainer worker holds no student engine (rollout.colocate is off)")
        return self.engine

    # -- colocated teachers (teachers.<name>.colocate): what `teacher_handle` calls --------------------------
    def ready_as(self, name: str) -> dict:
        return self._teachers().ready_as(name)

    def score_as(self, name: str, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> Any:
        return self._teachers().score_as(name, sequences, prompt_lens, top_k)

    def generate_as(self, name: str, prompt_ids: list[list[int]], **kw: Any) -> Any:
        return self._teachers().generate_as(name, prompt_ids, **kw)

    def _teachers(self) -> HfTeacherGroup:
        if self.teachers is None:
            raise RuntimeError("this trainer worker holds no teacher (teachers.<name>.colocate is off)")
        return self.teachers

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

    def open_weight_group(self, world: int) -> tuple[str, int]:
        """Rank 0: the weight-sync group's rendezvous store on this node's IP and a port of its own."""
        self.weight_group = None
        self._weight_store = open_store(node_ip(), world)
        return self._weight_store.host, self._weight_store.port

    def join_weight_group(self, world: int, backend: str) -> None:
        """Rank 0: form the group on the store `open_weight_group` opened; blocks until every engine joined."""
        store = self._weight_store  # kept until the next open_weight_group: if forming the group fails here, the
        # engines still reach the store and fail on their own at once, instead of waiting to connect to it
        self.weight_group = WeightGroup(store, 0, world, backend, store.host)

    def send_weights(self, full: bool, bucket_bytes: int) -> dict[str, float]:
        """Broadcast the weights to the engines in the weight-sync group (rank 0; `full` as in `publish`); blocks
        until every engine has received them. A failure (a dead engine) leaves the group: the driver forms it again."""
        if self.rank != 0 and not self.trainer.gathers:
            return {}
        sd = self.trainer.state_dict(trained_only=not full)
        if self.rank != 0:
            return {}
        group = self.weight_group
        if group is None:
            raise RuntimeError("trainer rank 0 is in no weight-sync group: RemoteTrainer.connect forms it")
        t0 = time.perf_counter()
        try:
            sent = group.send(sd.items(), bucket_bytes)
        except BaseException:
            self.weight_group = None  # closes its connections: the engines still waiting fail at once
            raise
        return {"mb": sent / 1e6, "s": time.perf_counter() - t0}

    def save(self, run_dir: str, step: int, extra: dict, files: dict | None = None) -> str:
        state = self.trainer.checkpoint_state()  # every rank: a collective under DeepSpeed
        if self.rank != 0:
            return ""
        return str(save_checkpoint(Path(run_dir), step, self.trainer, self.tokenizer, extra,
                                   keep=self.trainer.cfg.trainer.keep_checkpoints, state=state, files=files))

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
        r = cfg.rollout
        self.weight_sync = str(r.weight_sync)  # collective | object_store; a failed group falls back for good
        self.bucket_bytes = int(r.weight_sync_bucket_mb * 1e6)
        self.backend = "nccl" if cfg.trainer.num_gpus > 0 and r.num_gpus_per_engine > 0 else "gloo"
        self.members: list[Any] | None = None  # the engines in the weight-sync group with rank 0
        # The optimizer steps its weights hold (the checkpoint's step + steps taken here): a fault's recovery
        # knows whether the step it redoes was already applied.
        self.version = 0
        res = placement.plan.actor_resources("trainer")
        env = {"OMP_NUM_THREADS": str(_threads(cfg)), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "TOKENIZERS_PARALLELISM": "false"}
        self.colocated = bool(r.colocate)
        if self.colocated:  # an in-process engine; the trainer's thread count wins
            env = {**vllm_env(_threads(cfg)), **env}
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

    @property
    def sync_mode(self) -> str:
        """How weights reach the engines now (a collective that could not form has fallen back)."""
        return "in-process (colocated)" if self.colocated else self.weight_sync

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
            try:
                self._get(done[0])
            except ray.exceptions.RayTaskError:
                self._raise_dead_peer(pending)
                raise
        return self._get(refs[0])

    def _raise_dead_peer(self, pending: list[Any]) -> None:
        """A worker whose collective peer was SIGKILLed fails at once (gloo: "Connection closed by peer"),
        often before Ray has noticed the death: the dead peer is the fault to recover from, not that error."""
        if not pending:
            return
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=60)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                raise
            except Exception:  # noqa: BLE001 - another worker's own error; the first one is raised
                pass

    def ready(self) -> dict[str, Any]:
        return self._all([a.ready.remote() for a in self.actors])

    def step(self, batch: TrainBatch, progress: float | None = None) -> dict[str, float]:
        ref = ray.put(batch) if len(self.actors) > 1 else batch  # one copy in the object store for all workers
        out = self._all([a.step.remote(ref, progress) for a in self.actors])
        self.version += 1
        return out

    def connect(self, engines: list[Any]) -> bool:
        """Form the weight-sync group of rank 0 and `engines` (again, if one was formed before: an engine Ray
        restarted is in no group, and a group one of whose members died is broken); whether syncs now go over
        it. Every member must be free to join: call it between rollouts (an engine joins after the calls
        queued on it before). A group that cannot be formed (anything but a dead actor) sends every later sync
        through the object store, with a warning."""
        self.members = None
        if self.weight_sync != "collective" or self.colocated:  # colocated: an in-process copy, no group
            return False
        world = len(engines) + 1
        host, port = self._all([self.actor.open_weight_group.remote(world)])
        joins = [self.actor.join_weight_group.remote(world, self.backend),
                 *[e.join_weight_group.remote(host, port, i + 1, world, self.backend) for i, e in enumerate(engines)]]
        try:
            self.check_updates(joins, wait=True)
        except ray.exceptions.RayActorError:
            raise
        except Exception as e:  # noqa: BLE001
            self.weight_sync = "object_store"
            warnings.warn(f"rollout.weight_sync=collective: the {self.backend} group of trainer rank 0 and "
                          f"{len(engines)} engine(s) could not be formed ({str(e).splitlines()[0]}); weights go "
                          "through the Ray object store for the rest of this run", stacklevel=2)
            return False
        self.members = list(engines)
        return True

    def sync(self, engines: list[Any], version: int | None = None, wait: bool = True, full: bool = True) -> list[Any]:
        """Send the trainer's current weights (policy `version`, stamped on the samples generated with them) to
        every engine. The driver submits the engines' updates, so they are ordered with its own generate calls
        (a rollout submitted afterwards samples with these weights). `wait`: return when every engine holds
        them; otherwise return the updates' references at once (the engines apply them between requests;
        `check_updates` raises a failure). `full=False`: only the trained tensors, for engines that already
        hold this run's frozen ones (not a restarted engine, not after a resume: those loaded `student.path`).

        Collective: rank 0's broadcast and every engine's receive are submitted together; rank 0 waits in its
        broadcast until each engine has served the rollouts queued on it before the update, then the weights
        go bucket by bucket (a trainer call submitted later waits behind it). The group is formed on first use
        (`connect`)."""
        if self.colocated:  # the engines are this trainer's own actors: each copies its weights in-process
            updates = [a.sync_engine.remote(version, full) for a in self.actors]
        elif self.weight_sync == "collective" and (self.members == list(engines) or self.connect(engines)):
            sends = [a.send_weights.remote(full, self.bucket_bytes) for a in self.actors]
            updates = [e.receive_weights.remote(version) for e in engines] + sends
        else:
            [ref] = self._all([a.publish.remote(full) for a in self.actors])
            updates = [e.update_weights.remote(ref, version) for e in engines]
        if wait:
            self.check_updates(updates, wait=True)
        return updates

    def check_updates(self, refs: list[Any], wait: bool = False) -> list[Any]:
        """Raise the first failure among a sync's finished calls and return those still running (`wait`: wait
        for all). A dead actor is raised before the collective errors its death caused in its peers (their
        connections to it closed): the step loop recovers from the first, not from the second."""
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
        try:
            for ref in ready:
                self._get(ref)
        except Exception:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=_SETTLE_S)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    raise
                except Exception:  # noqa: BLE001 - the first failure is raised below
                    pass
            raise
        return pending

    def save(self, run_dir: Path, step: int, extra: dict, files: dict | None = None) -> Path:
        """`files`: kept with the checkpoint (`save_checkpoint`); only rank 0 writes, only rank 0 gets them."""
        return Path(self._all([a.save.remote(str(run_dir), step, extra, files if rank == 0 else None)
                               for rank, a in enumerate(self.actors)]))

    def load(self, ck: Path) -> dict:
        st = self._all([a.load.remote(str(ck)) for a in self.actors])
        self.version = int(st.get("step", 0))
        return st

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
