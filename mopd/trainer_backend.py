"""`trainer.backend`: what differs between plain accelerate (one process, or DDP across workers) and DeepSpeed
ZeRO, behind the few calls the trainer and the checkpoints make. The trainer's step reads the same for both;
checkpoints talk to the adapter, never to accelerate or DeepSpeed themselves.

Optimizer state is written whole in both cases (DeepSpeed's own checkpoint only loads into the same worker
count), so a checkpoint loads into any number of workers; a checkpoint of one backend is refused by the
other with a message saying which wrote it.
"""

from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from mopd.config import TrainerConfig

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
WHOLE_ADAM_FORMAT = "mopd-full-adam/1"


class AccelerateBackend:
    """accelerate on one process, or DDP across the data-parallel workers."""

    name = "accelerate"
    # A non-finite gradient norm skips the step here (DeepSpeed's engine steps on its own terms).
    skips_nonfinite = True

    def __init__(self, t: TrainerConfig) -> None:
        self.t = t

    def plugin(self) -> DeepSpeedPlugin | None:
        # A ZeRO-3 trainer earlier in this process leaves transformers partitioning every model it loads
        # afterwards; a plain trainer must not inherit that.
        unset_hf_deepspeed_config()
        return None

    def configure(self, acc: Accelerator, world: int) -> None:
        pass

    def gathers(self, world: int) -> bool:
        """Reading the weights is a collective every worker must join (ZeRO-3 partitions them)."""
        return False

    def backward(self, acc: Accelerator, model: Any, loss: torch.Tensor, last: bool, world: int) -> None:
        """Accumulate a micro-batch's gradient; only the last one of a pass averages across workers."""
        with nullcontext() if last or world == 1 else acc.no_sync(model):
            acc.backward(loss)

    def optimizer_state(self, trainer: Any) -> dict[str, Any]:
        return {"optimizer": trainer.opt.state_dict(), "scheduler": trainer.sched.state_dict(),
                "frozen": sorted(trainer.frozen)}

    def load_optimizer_state(self, trainer: Any, st: dict[str, Any]) -> None:
        if "optimizer" not in st:
            raise ValueError("this checkpoint was written by trainer.backend=deepspeed; resume it with "
                             "trainer.backend=deepspeed (or start a new run from its model folder)")
        if sorted(st.get("frozen", [])) != sorted(trainer.frozen):
            raise ValueError(f"this checkpoint's optimizer state was written with trainer.freeze matching "
                             f"{len(st.get('frozen', []))} parameters, this run's matches {len(trainer.frozen)}: "
                             "resume with the trainer.freeze that wrote it (or start a new run from its model "
                             "folder)")
        trainer.sched.load_state_dict(st["scheduler"])
        trainer.opt.load_state_dict(st["optimizer"])

    def load_legacy(self, acc: Accelerator, folder: str) -> None:
        """An accelerate `save_state` folder (mopd <= 0.14's DeepSpeed checkpoints): the same worker count only."""
        acc.load_state(folder)


class DeepSpeedBackend(AccelerateBackend):
    """DeepSpeed ZeRO 1/2/3 through accelerate's plugin (its CPU accelerator and gloo off GPUs)."""

    name = "deepspeed"
    skips_nonfinite = False

    def plugin(self) -> DeepSpeedPlugin:
        _single_process_dist_env()
        return DeepSpeedPlugin(zero_stage=self.t.zero_stage, gradient_clipping=self.t.grad_clip,
                               gradient_accumulation_steps=1, zero3_save_16bit_model=True)

    def configure(self, acc: Accelerator, world: int) -> None:
        # Nominal sizes DeepSpeed insists on; the trainer forms its own micro-batches and accumulation boundaries.
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = self.t.micro_batch_size
        ds["train_batch_size"] = self.t.micro_batch_size * world

    def gathers(self, world: int) -> bool:
        return self.t.zero_stage == 3 and world > 1

    def backward(self, acc: Accelerator, model: Any, loss: torch.Tensor, last: bool, world: int) -> None:
        """DeepSpeed's accumulation boundary: the last micro-batch of a pass reduces and steps its engine."""
        acc.deepspeed_engine_wrapped.engine.set_gradient_accumulation_boundary(last)
        acc.gradient_state._set_sync_gradients(last)
        try:
            acc.backward(loss)
        finally:
            acc.gradient_state._set_sync_gradients(True)

    def optimizer_state(self, trainer: Any) -> dict[str, Any]:
        """Each parameter's Adam moments gathered by name (DeepSpeed partitions them across the workers). A
        collective: every worker calls it."""
        from deepspeed.utils import safe_get_full_optimizer_state

        moments = {}
        for name, p in trainer.unwrapped.named_parameters():
            if name in trainer.frozen:  # no optimizer state
                continue
            got = {k: safe_get_full_optimizer_state(p, k) for k in _ADAM_MOMENTS}
            moments[name] = {k: v.detach().to("cpu", torch.float32) for k, v in got.items() if v is not None}
        return {"format": WHOLE_ADAM_FORMAT, "moments": moments, "adam_step": self._adam_step(trainer.acc),
                "scheduler": trainer.sched.state_dict()}

    def load_optimizer_state(self, trainer: Any, st: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if "optimizer" in st:
            raise ValueError("this checkpoint was written by trainer.backend=accelerate; its optimizer state "
                             "cannot be loaded by trainer.backend=deepspeed (resume with the backend that wrote "
                             "it, or start a new run from its model folder)")
        trainer.sched.load_state_dict(st["scheduler"])
        self._materialise_state(trainer)
        dev = trainer.acc.device
        for name, p in trainer.unwrapped.named_parameters():
            if name in trainer.frozen:
                continue
            for k, v in st["moments"].get(name, {}).items():
                safe_set_full_optimizer_state(p, v.to(dev), k)
        base = _base_optimizer(trainer.acc)
        for state in (base.state.values() if base is not None else []):
            if "step" in state:
                state["step"] = (torch.as_tensor(float(st["adam_step"]), dtype=state["step"].dtype)
                                 if torch.is_tensor(state["step"]) else st["adam_step"])

    def _materialise_state(self, trainer: Any) -> None:
        """DeepSpeed creates Adam's state at the first step; loading into it needs one. A step at lr 0 on a zero
        loss creates zero moments and changes no weight (AdamW's decay is lr-scaled too)."""
        base = _base_optimizer(trainer.acc)
        if base is None or any(base.state.values()):
            return
        lrs = [g["lr"] for g in base.param_groups]
        for g in base.param_groups:
            g["lr"] = 0.0
        ids = torch.zeros((1, 2), dtype=torch.long, device=trainer.acc.device)
        self.backward(trainer.acc, trainer.model, trainer.model(input_ids=ids).logits.sum() * 0.0, True, 1)
        for g, lr in zip(base.param_groups, lrs, strict=True):
            g["lr"] = lr

    @staticmethod
    def _adam_step(acc: Accelerator) -> int:
        base = _base_optimizer(acc)
        for state in (base.state.values() if base is not None else []):
            if "step" in state:
                return int(state["step"])
        return 0


def _base_optimizer(acc: Accelerator) -> Any:
    """The torch AdamW inside DeepSpeed's ZeRO optimizer (its `state` holds the moments and step)."""
    return getattr(acc.deepspeed_engine_wrapped.engine.optimizer, "optimizer", None)


def _single_process_dist_env() -> None:
    """DeepSpeed needs a process group; outside a launcher, make this process a world of one on loopback."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})


def make_backend(t: TrainerConfig) -> AccelerateBackend:
    return DeepSpeedBackend(t) if t.backend == "deepspeed" else AccelerateBackend(t)
