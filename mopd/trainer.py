"""The student's trainer: recompute pi_old, apply the train/inference correction, build advantages,
take the optimizer step. accelerate on CPU and single GPU; DeepSpeed ZeRO through accelerate's plugin.

All math comes from the pure functions in `rewards/`, `stability/` and `mopd/losses.py`; this file only
moves tensors between them and the model.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import torch

from mopd.batch import TrainBatch
from mopd.config import MopdConfig
from mopd.losses import pg_loss, reverse_kl_loss, token_entropy
from rewards.advantages import advantage_metrics, combine_advantages, grpo_outcome_advantage, mopd_advantage
from stability.correction import correction_weights
from stability.diagnostics import mismatch_metrics, teacher_kl


class NonFiniteError(RuntimeError):
    pass


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        if schedule == "linear":
            return 1.0 - frac
        return 1.0

    return f


def _single_process_dist_env() -> None:
    """DeepSpeed needs a process group; outside a launcher, make this process a world of one on loopback."""
    import os
    import socket

    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})


class Trainer:
    def __init__(self, cfg: MopdConfig, model_path: str) -> None:
        from accelerate import Accelerator
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        t = cfg.trainer
        torch.manual_seed(t.seed)
        plugin = None
        if t.backend == "deepspeed":
            _single_process_dist_env()
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin(zero_stage=t.zero_stage, gradient_clipping=t.grad_clip,
                                     gradient_accumulation_steps=1, zero3_save_16bit_model=True)
        # One trainer per process owns accelerate's process-wide state (tests build several in a row).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        if plugin is None:
            # A ZeRO-3 trainer earlier in this process leaves transformers partitioning every model it
            # loads afterwards; a plain trainer must not inherit that.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        # accelerate's cpu=True would drop the DeepSpeed plugin; without CUDA it picks the CPU anyway.
        self.acc = Accelerator(cpu=plugin is None and not torch.cuda.is_available(), deepspeed_plugin=plugin,
                               mixed_precision="bf16" if t.precision == "bf16" else "no")
        if plugin is not None:
            self.acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
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

    # -- one optimizer step --------------------------------------------------------------------
    def step(self, b: TrainBatch) -> dict[str, float]:
        a, t = self.cfg.algorithm, self.cfg.trainer
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        old_BT = self.logprobs(b)
        metrics["timing_s/reference"] = time.perf_counter() - t0
        mask = b.mask_BT
        if a.objective == "sft":
            return self._sft_step(b, metrics)
        weights, corr = correction_weights(a.correction, old_BT, b.rollout_logprobs_BT, mask,
                                           low=a.icepop_low, high=a.icepop_high, cap=a.tis_cap)
        metrics.update(corr)
        metrics.update(mismatch_metrics(old_BT, b.rollout_logprobs_BT, mask, weights))
        if self.r3_counts is not None:
            # r3/router_agreement: the routing the trainer's forward used vs the engine's (1.0 on replayed
            # positions with R3 on); r3/own_router_agreement: what the router itself would have picked.
            metrics.update(self.r3_applied.metrics())
            own = self.r3_counts.metrics()
            metrics["r3/own_router_agreement"] = own["r3/router_agreement"]
            metrics["r3/own_token_any_mismatch"] = own["r3/token_any_mismatch"]
        a_mopd = mopd_advantage(b.teacher_logprobs_BT, old_BT, mask)
        a_orm = None
        if a.alpha_orm != 0:
            scores = torch.nan_to_num(b.scores_B, nan=0.0)
            a_orm = grpo_outcome_advantage(scores, b.group_B)
        if a.objective == "orm":  # outcome-only RL baseline (GRPO advantages), no teacher term
            a_orm = grpo_outcome_advantage(torch.nan_to_num(b.scores_B, nan=0.0), b.group_B)
            adv = combine_advantages(torch.zeros_like(a_mopd), a_orm, 1.0, mask)
        else:
            adv = combine_advantages(a_mopd, a_orm, a.alpha_orm, mask)
        metrics.update(advantage_metrics(adv, mask))
        if a.objective != "orm":  # outcome-only RL never asks a teacher
            metrics["mopd/teacher_kl"] = teacher_kl(old_BT, b.teacher_logprobs_BT, mask)
            for d in sorted(set(b.domains)):
                rows = [i for i, x in enumerate(b.domains) if x == d]
                metrics[f"mopd/teacher_kl/{d}"] = teacher_kl(old_BT[rows], b.teacher_logprobs_BT[rows], mask[rows])

        t1 = time.perf_counter()
        use_pg = a.objective in ("pg", "mixed", "orm")
        use_kl = a.objective in ("reverse_kl", "mixed")
        several = a.ppo_epochs > 1
        if use_kl and b.teacher_topk_ids_BTK is None:
            raise ValueError(f"algorithm.objective={a.objective} needs the teachers' top-k log-probs, but the batch "
                             "has none; set algorithm.teacher_top_k (-1 = whole vocabulary)")
        for _ in range(a.ppo_epochs):
            sums = {"actor/pg_loss": 0.0, "actor/kl_loss": 0.0, "actor/entropy": 0.0}
            for idx in self._micro(b):
                mb = b.select(idx)
                frac = len(idx) / b.size
                lp_BT, logp_BTV = self._forward(mb)
                loss = torch.zeros((), dtype=torch.float32)
                if use_pg:
                    pg, _ = pg_loss(lp_BT, adv[idx], weights[idx], mask[idx],
                                    old_BT[idx] if several else None, a.ppo_clip if several else None)
                    loss = loss + pg
                    sums["actor/pg_loss"] += pg.item() * frac
                if use_kl:
                    kl, _ = reverse_kl_loss(logp_BTV, mb.teacher_topk_ids_BTK, mb.teacher_topk_logprobs_BTK,
                                            weights[idx], mask[idx])
                    loss = loss + a.kl_coef * kl
                    sums["actor/kl_loss"] += kl.item() * frac
                with torch.no_grad():
                    sums["actor/entropy"] += token_entropy(logp_BTV, mask[idx]).item() * frac
                if not torch.isfinite(loss):
                    raise NonFiniteError(self._nan_message("loss", loss.item()))
                self.acc.backward(loss * frac)
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not math.isfinite(grad_norm) and self.cfg.trainer.backend != "deepspeed":
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
        metrics["timing_s/train"] = time.perf_counter() - t1
        return metrics

    def _sft_step(self, b: TrainBatch, metrics: dict[str, float]) -> dict[str, float]:
        """Off-policy SFT baseline: token-mean NLL of teacher samples (pg_loss with A = 1, w = 1)."""
        t1 = time.perf_counter()
        nll = 0.0
        for idx in self._micro(b):
            frac = len(idx) / b.size
            lp_BT, _ = self._forward(b.select(idx))
            loss, _ = pg_loss(lp_BT, b.mask_BT[idx], None, b.mask_BT[idx])
            nll += loss.item() * frac
            self.acc.backward(loss * frac)
        grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip))
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        metrics.update({"actor/sft_loss": nll, "actor/grad_norm": grad_norm, "actor/lr": self.sched.get_last_lr()[0],
                        "timing_s/train": time.perf_counter() - t1})
        return metrics

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
