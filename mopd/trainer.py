"""The student's trainer: recompute pi_old, apply the train/inference correction, build advantages,
take the optimizer step. accelerate on CPU and single GPU; DeepSpeed ZeRO through accelerate's plugin.

All math comes from the pure functions in `rewards/`, `stability/` and `mopd/losses.py`; this file only
moves tensors between them and the model.
"""

from __future__ import annotations

import math
import os
import socket
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from mopd.batch import TrainBatch
from mopd.config import MopdConfig
from mopd.losses import agg_norm, token_entropy
from mopd.objectives import LossInputs, get_objective
from mopd.schedules import make_lr_scheduler
from mopd.timing import timed
from rewards.advantages import advantage_metrics, combine_advantages, grpo_outcome_advantage, mopd_advantage
from stability.correction import correction_weights
from stability.diagnostics import mismatch_metrics, teacher_kl


class NonFiniteError(RuntimeError):
    pass


def _single_process_dist_env() -> None:
    """DeepSpeed needs a process group; outside a launcher, make this process a world of one on loopback."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})


class Trainer:
    def __init__(self, cfg: MopdConfig, model_path: str) -> None:
        self.cfg = cfg
        self.objective = get_objective(cfg.algorithm.objective)
        t = cfg.trainer
        torch.manual_seed(t.seed)
        plugin = None
        if t.backend == "deepspeed":
            _single_process_dist_env()
            plugin = DeepSpeedPlugin(zero_stage=t.zero_stage, gradient_clipping=t.grad_clip,
                                     gradient_accumulation_steps=1, zero3_save_16bit_model=True)
        # One trainer per process owns accelerate's process-wide state (tests build several in a row).
        AcceleratorState._reset_state(reset_partial_state=True)
        if plugin is None:
            # A ZeRO-3 trainer earlier in this process leaves transformers partitioning every model it
            # loads afterwards; a plain trainer must not inherit that.
            unset_hf_deepspeed_config()
        # accelerate's cpu=True would drop the DeepSpeed plugin; without CUDA it picks the CPU anyway.
        self.acc = Accelerator(cpu=plugin is None and not torch.cuda.is_available(), deepspeed_plugin=plugin,
                               mixed_precision="bf16" if t.precision == "bf16" else "no")
        if plugin is not None:
            self.acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        sched = make_lr_scheduler(opt, t)  # before prepare: the peak lr is read from the optimizer
        self.model, self.opt, self.sched = self.acc.prepare(model, opt, sched)
        self.bad_steps = 0
        # R3: force every router to the experts the engine used (hooks sit on the inner modules, so they
        # fire through any accelerate/DeepSpeed wrapper).
        # With R3 off but routing captured by the engine, the same hooks only observe, so runs with R3
        # off and on report comparable agreement figures.
        self.replay: Any = None
        self.observe_routing = cfg.algorithm.r3_capture or cfg.algorithm.r3
        if self.observe_routing:
            from stability.r3 import RoutingReplay

            self.routing = RoutingReplay(self.acc.unwrap_model(self.model))
            self.replay = self.routing if cfg.algorithm.r3 else None
        self.r3_counts: Any = None

    # -- forward -------------------------------------------------------------------------------
    def _forward(self, b: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = (self.replay.context(b.routed_experts_BLNK, b.attention_mask_BL)
               if self.replay is not None else nullcontext())
        with ctx, self.acc.autocast():
            logits = self.model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL).logits
        logp_BTV = logits[:, :-1].float().log_softmax(-1)
        lp_BT = logp_BTV.gather(-1, b.input_ids_BL[:, 1:, None]).squeeze(-1)
        return lp_BT, logp_BTV

    def _micro(self, b: TrainBatch) -> list[list[int]]:
        m = self.cfg.trainer.micro_batch_size
        return [list(range(i, min(i + m, b.size))) for i in range(0, b.size, m)]

    @torch.no_grad()
    def logprobs(self, b: TrainBatch) -> torch.Tensor:
        """pi_old: the trainer's own log-prob of every sampled token, before this step's update.

        Routing agreement is measured here: these are exactly the weights the engine sampled with.
        """
        out = []
        observe = self.observe_routing and b.routed_experts_BLNK is not None
        if observe:
            from stability.r3 import RoutingCounts, routing_counts

            self.r3_counts = RoutingCounts()
            self.r3_applied = RoutingCounts()
        for idx in self._micro(b):
            mb = b.select(idx)
            if observe and self.replay is None:
                with self.routing.capture() as cap:
                    out.append(self._forward(mb)[0])
                counts = routing_counts(cap.experts_BLNK, mb.routed_experts_BLNK, mb.attention_mask_BL.bool())
                self.r3_counts += counts
                self.r3_applied += counts  # nothing replayed: the router's own choice is what was used
                continue
            out.append(self._forward(mb)[0])
            if observe:
                self.r3_counts += self.replay.last_stats().counts
                self.r3_applied += self.replay.last_stats().applied_counts
        if not observe:
            self.r3_counts = None
        return torch.cat(out)

    # -- one optimizer step: pi_old + diagnostics, advantages, optimisation --------------------
    def step(self, b: TrainBatch, progress: float | None = None) -> dict[str, float]:
        """One update. `progress` in [0, 1] (a wall-clock schedule horizon) sets where the LR schedule is,
        instead of counting steps."""
        metrics: dict[str, float] = {}
        with timed("old_log_prob", metrics):
            old_BT = self.logprobs(b)
        weights_BT = self.correction(b, old_BT, metrics)
        adv_BT = self.advantages(b, old_BT, metrics)
        if progress is not None:  # LambdaLR.step() advances last_epoch by one, then evaluates the schedule
            inner = getattr(self.sched, "scheduler", self.sched)  # accelerate wraps the LambdaLR
            inner.last_epoch = round(min(max(progress, 0.0), 1.0) * self.cfg.trainer.steps) - 1
        with timed("train", metrics):
            self.optimize(b, old_BT, adv_BT, weights_BT, metrics)
        return metrics

    def correction(self, b: TrainBatch, old_BT: torch.Tensor, metrics: dict[str, float]) -> torch.Tensor | None:
        """IcePop/TIS weights from pi_old vs the engine's mu, and the mismatch and routing diagnostics."""
        a = self.cfg.algorithm
        if not self.objective.corrected:  # teacher samples: the student's engine never sampled them
            return None
        weights_BT, corr = correction_weights(str(a.correction), old_BT, b.rollout_logprobs_BT, b.mask_BT,
                                              low=a.icepop_low, high=a.icepop_high, cap=a.tis_cap)
        metrics.update(corr)
        metrics.update(mismatch_metrics(old_BT, b.rollout_logprobs_BT, b.mask_BT, weights_BT,
                                        low=a.icepop_low, high=a.icepop_high))
        if self.r3_counts is not None:
            # r3/router_agreement: the routing the trainer's forward used vs the engine's (1.0 on replayed
            # positions with R3 on); r3/own_router_agreement: what the router itself would have picked.
            metrics.update(self.r3_applied.metrics())
            own = self.r3_counts.metrics()
            metrics["r3/own_router_agreement"] = own["r3/router_agreement"]
            metrics["r3/own_token_any_mismatch"] = own["r3/token_any_mismatch"]
        return weights_BT

    def advantages(self, b: TrainBatch, old_BT: torch.Tensor, metrics: dict[str, float]) -> torch.Tensor:
        """Per-token advantages for the objective, and the teacher KL overall and per domain."""
        a, mask = self.cfg.algorithm, b.mask_BT
        kind = self.objective.advantage
        if kind == "none":
            return mask.clone()
        scores_B = torch.nan_to_num(b.scores_B, nan=0.0)
        if kind == "orm":
            adv = combine_advantages(torch.zeros_like(mask), grpo_outcome_advantage(scores_B, b.group_B), 1.0, mask)
        else:
            a_mopd = mopd_advantage(b.teacher_logprobs_BT, old_BT, mask, clip=a.advantage_clip)
            a_orm = grpo_outcome_advantage(scores_B, b.group_B) if a.alpha_orm != 0 else None
            adv = combine_advantages(a_mopd, a_orm, a.alpha_orm, mask)
        metrics.update(advantage_metrics(adv, mask))
        if self.objective.needs_teacher_scores:
            metrics["mopd/teacher_kl"] = teacher_kl(old_BT, b.teacher_logprobs_BT, mask)
            for d in sorted(set(b.domains)):
                rows = [i for i, x in enumerate(b.domains) if x == d]
                metrics[f"mopd/teacher_kl/{d}"] = teacher_kl(old_BT[rows], b.teacher_logprobs_BT[rows], mask[rows])
        return adv

    def optimize(self, b: TrainBatch, old_BT: torch.Tensor, adv_BT: torch.Tensor, weights_BT: torch.Tensor | None,
                 metrics: dict[str, float]) -> None:
        """`ppo_epochs` passes over the batch in micro-batches, gradients accumulated, one step per pass."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        mask = b.mask_BT
        # loss_agg_mode: domain ids and normalisers of the whole batch, so that the row-weighted micro-batch
        # losses below sum to the whole-batch loss (and gradient) exactly in every mode.
        ids = {d: i for i, d in enumerate(sorted(set(b.domains)))}
        domain_B = torch.tensor([ids[d] for d in b.domains], dtype=torch.long)
        norm = agg_norm(mask, domain_B)
        grad_norm = float("nan")
        for _ in range(a.ppo_epochs):
            sums: dict[str, float] = {"actor/loss": 0.0, "actor/entropy": 0.0}
            for idx in self._micro(b):
                mb = b.select(idx)
                frac = len(idx) / b.size
                lp_BT, logp_BTV = self._forward(mb)
                x = LossInputs(lp_BT, logp_BTV, adv_BT[idx], None if weights_BT is None else weights_BT[idx],
                               mask[idx], old_BT[idx], mb.teacher_topk_ids_BTK, mb.teacher_topk_logprobs_BTK,
                               domain_B[idx], norm)
                loss, parts = self.objective.loss(x, a)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * frac
                sums["actor/loss"] += loss.item() * frac
                with torch.no_grad():
                    sums["actor/entropy"] += token_entropy(logp_BTV, mask[idx]).item() * frac
                if not torch.isfinite(loss):
                    raise NonFiniteError(self._nan_message("loss", loss.item()))
                self.acc.backward(loss * frac)
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not math.isfinite(grad_norm) and t.backend != "deepspeed":
                self.opt.zero_grad()
                self.bad_steps += 1
                if self.bad_steps >= 3:
                    raise NonFiniteError(self._nan_message("gradient norm", grad_norm))
                metrics["actor/skipped_step"] = 1.0
                continue
            self.bad_steps = 0
            self.opt.step()
            self.opt.zero_grad()
        self.sched.step()
        metrics.update(sums)
        metrics["actor/grad_norm"] = grad_norm
        metrics["actor/lr"] = self.sched.get_last_lr()[0]

    def _nan_message(self, what: str, value: float) -> str:
        return (f"non-finite {what} ({value}) in the trainer; no update was applied and the last checkpoint is "
                "intact. Lower trainer.lr, keep trainer.grad_clip on, or check the teacher's log-probs for NaN.")

    # -- weights out ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 CPU weights (gathered under ZeRO-3) for the engines and checkpoints."""
        sd = self.acc.get_state_dict(self.model)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    @property
    def unwrapped(self) -> Any:
        return self.acc.unwrap_model(self.model)
