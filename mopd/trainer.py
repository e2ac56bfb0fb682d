"""The student's trainer: recompute pi_old, apply the train/inference correction, build advantages,
take the optimizer step. accelerate on CPU and single GPU; DeepSpeed ZeRO through accelerate's plugin.

All math comes from the pure functions in `rewards/`, `stability/` and `mopd/losses.py`; this file only
moves tensors between them and the model.
"""

from __future__ import annotations

import fnmatch
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

from mopd.batch import TrainBatch, split_rows
from mopd.chunked_logits import token_stats
from mopd.config import ConfigError, MopdConfig
from mopd.losses import ReverseKLTerms, agg_norm, sanitize_teacher_topk, token_entropy
from mopd.objectives import LossInputs, get_objective
from mopd.schedules import make_lr_scheduler
from mopd.timing import timed
from rewards.advantages import (
    advantage_metrics,
    combine_advantages,
    grpo_outcome_advantage,
    mopd_advantage,
    normalize_advantage,
)
from stability.correction import correction_weights
from stability.diagnostics import mismatch_metrics, teacher_kl
from stability.r3 import RoutingCounts, RoutingReplay, routing_counts

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
# Loss-part metrics that are means over a micro-batch's valid tokens (the rest are parts of the loss, whose
# micro-batch values add up by rows).
_TOKEN_MEANS = frozenset({"actor/pg_clipfrac", "actor/ppo_kl", "distillation/reverse_kl", "distillation/student_mass",
                          "distillation/teacher_mass", "distillation/nonfinite_frac"})


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


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> set[str]:
    """Turn off the gradient of every parameter matching one of `patterns` (fnmatch); returns their names.
    A pattern that matches nothing is a typo, not a no-op: the error lists names to pick from."""
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    for pat in patterns:
        hit = fnmatch.filter(names, pat)
        if not hit:
            sample = ", ".join(n for n in names if ".layers.0." in n or ".layers." not in n)
            raise ConfigError(f"config key 'trainer.freeze': pattern {pat!r} matches no parameter of the student; "
                              f"its parameters include: {sample}")
        frozen.update(hit)
    if frozen and len(frozen) == len(names):
        raise ConfigError(f"config key 'trainer.freeze': {patterns} freezes every parameter; nothing would train")
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return frozen


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
        # The LR schedule steps once per optimizer step whatever the worker count (accelerate would otherwise
        # step it once per process).
        self.acc = Accelerator(cpu=plugin is None and not torch.cuda.is_available(), deepspeed_plugin=plugin,
                               mixed_precision="bf16" if t.precision == "bf16" else "no",
                               step_scheduler_with_optimizer=False)
        # From the process group itself: accelerate counts one process when DeepSpeed runs on CPU.
        dist = torch.distributed
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if plugin is not None:
            # Nominal sizes DeepSpeed insists on; the step forms its own micro-batches and accumulation boundaries.
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
            ds["train_batch_size"] = t.micro_batch_size * self.world
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.frozen = freeze_parameters(model, t.freeze)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                weight_decay=t.weight_decay)
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
            self.routing = RoutingReplay(self.acc.unwrap_model(self.model))
            self.replay = self.routing if cfg.algorithm.r3 else None
        self.r3_counts: Any = None
        self.observing = False
        # pi_old from the training forward when one pass is made over the batch (tests turn it off to compare).
        self.fuse_old_log_prob = True

    # -- forward -------------------------------------------------------------------------------
    def _forward(self, b: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = (self.replay.context(b.routed_experts_BLNK, b.attention_mask_BL)
               if self.replay is not None else nullcontext())
        with ctx, self.acc.autocast():
            logits = self.model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL).logits
        logp_BTV = logits[:, :-1].float().log_softmax(-1)
        lp_BT = logp_BTV.gather(-1, b.input_ids_BL[:, 1:, None]).squeeze(-1)
        return lp_BT, logp_BTV

    def _forward_chunked(self, b: TrainBatch, with_kl: bool) -> tuple[torch.Tensor, ReverseKLTerms | None,
                                                                       torch.Tensor]:
        """`trainer.logits_chunk_tokens` > 0: log-probs, entropy (detached) and the teacher-KL terms of the
        response positions, `[B, T]` each, from the final hidden states in chunks of positions, so that no
        `[tokens, vocabulary]` tensor of the micro-batch exists (mopd.chunked_logits). The wrapped model still
        runs the forward (DDP and DeepSpeed see it), keeping only the last position's logits."""
        model = self.acc.unwrap_model(self.model)
        got: dict[str, torch.Tensor] = {}
        hook = model.get_decoder().register_forward_hook(
            lambda _m, _i, out: got.__setitem__("h", out.last_hidden_state))
        ctx = (self.replay.context(b.routed_experts_BLNK, b.attention_mask_BL)
               if self.replay is not None else nullcontext())
        try:
            with ctx, self.acc.autocast():
                self.model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL, logits_to_keep=1)
        finally:
            hook.remove()
        mask = b.mask_BT.bool()
        bi, ti = mask.nonzero(as_tuple=True)
        ids = lps = None
        if with_kl:
            ok, nan, ids_BTK, lps_BTK = sanitize_teacher_topk(b.teacher_topk_ids_BTK, b.teacher_topk_logprobs_BTK,
                                                              b.mask_BT)
            ids, lps = ids_BTK[bi, ti], lps_BTK[bi, ti]
        with self.acc.autocast():
            st = token_stats(got["h"][bi, ti], model.get_output_embeddings(), b.input_ids_BL[bi, ti + 1], ids, lps,
                             chunk_tokens=self.cfg.trainer.logits_chunk_tokens)

        def scatter(v_N: torch.Tensor) -> torch.Tensor:
            return v_N.new_zeros(mask.shape).index_put((bi, ti), v_N)

        kl = None
        if with_kl:
            assert st.kl_N is not None and st.student_mass_N is not None and st.teacher_mass_N is not None
            kl = ReverseKLTerms(scatter(st.kl_N), scatter(st.student_mass_N), scatter(st.teacher_mass_N), ok, nan)
        return scatter(st.logprobs_N), kl, scatter(st.entropy_N.detach())

    def _micro(self, b: TrainBatch) -> list[list[int]]:
        """This worker's micro-batches of `b` (row indices): its token-balanced share of the batch."""
        t = self.cfg.trainer
        return split_rows(b.lengths(), self.world, t.micro_batch_size, t.max_tokens_per_micro_batch)[self.rank]

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel workers (identity for one)."""
        if self.world == 1:
            return x
        y = x.to("cuda" if "nccl" in str(torch.distributed.get_backend()) else "cpu")
        torch.distributed.all_reduce(y)
        return y.cpu()

    def _pass(self, mb: TrainBatch, with_kl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                    ReverseKLTerms | None, torch.Tensor | None]:
        """One forward of a micro-batch: `(lp_BT, logp_BTV, kl terms, entropy_BT)`; the full-vocabulary
        `logp_BTV` without chunking, the chunked KL terms and entropy with it."""
        if self.cfg.trainer.logits_chunk_tokens:
            lp_BT, kl, ent_BT = self._forward_chunked(mb, with_kl)
            return lp_BT, None, kl, ent_BT
        lp_BT, logp_BTV = self._forward(mb)
        return lp_BT, logp_BTV, None, None

    def _start_counts(self, b: TrainBatch) -> None:
        """R3 agreement is counted on the forward that computes pi_old: the weights the engine sampled with."""
        self.observing = self.observe_routing and b.routed_experts_BLNK is not None
        self.r3_counts = RoutingCounts() if self.observing else None
        self.r3_applied = RoutingCounts()

    def _observed(self, mb: TrainBatch, with_kl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                        ReverseKLTerms | None, torch.Tensor | None]:
        if not self.observing:
            return self._pass(mb, with_kl)
        if self.replay is None:
            with self.routing.capture() as cap:
                out = self._pass(mb, with_kl)
            counts = routing_counts(cap.experts_BLNK, mb.routed_experts_BLNK, mb.attention_mask_BL.bool())
            self.r3_counts += counts
            self.r3_applied += counts  # nothing replayed: the router's own choice is what was used
            return out
        out = self._pass(mb, with_kl)
        self.r3_counts += self.replay.last_stats().counts
        self.r3_applied += self.replay.last_stats().applied_counts
        return out

    def _finish_counts(self) -> None:
        if self.observing and self.world > 1:  # every worker reports the whole batch's routing agreement
            fields = list(RoutingCounts.__dataclass_fields__)
            both = self._all_sum(torch.tensor([[getattr(c, f) for f in fields] for c in (self.r3_counts,
                                                                                            self.r3_applied)]))
            self.r3_counts, self.r3_applied = (RoutingCounts(*(int(v) for v in row)) for row in both.tolist())

    @torch.no_grad()
    def logprobs(self, b: TrainBatch) -> torch.Tensor:
        """pi_old: the trainer's own log-prob of every sampled token, before this step's update (whole batch,
        summed across the workers)."""
        self._start_counts(b)
        old_BT = torch.zeros(b.mask_BT.shape)  # this worker's rows; the others' arrive by the sum below
        for idx in self._micro(b):
            mb = b.select(idx, trim=True)
            old_BT[idx, :mb.mask_BT.shape[1]] = self._observed(mb)[0]
        self._finish_counts()
        return self._all_sum(old_BT)

    # -- one optimizer step: pi_old + diagnostics, advantages, optimisation --------------------
    def step(self, b: TrainBatch, progress: float | None = None) -> dict[str, float]:
        """One update. `progress` in [0, 1] (a wall-clock schedule horizon) sets where the LR schedule is,
        instead of counting steps.

        With one pass over the batch (`algorithm.ppo_epochs` 1) pi_old is the training forward's own log-prob,
        detached: the same weights and micro-batches give the same values as a separate no-grad pass, which
        is then skipped (`timing_s/old_log_prob` 0). Correction weights and advantages are per token (per row
        for the sequence mask; the outcome term is formed on the whole batch first), so forming them micro-batch
        by micro-batch gives the same update; their whole-batch metrics are computed afterwards."""
        metrics: dict[str, float] = {}
        if progress is not None:  # LambdaLR.step() advances last_epoch by one, then evaluates the schedule
            inner = getattr(self.sched, "scheduler", self.sched)  # accelerate wraps the LambdaLR
            inner.last_epoch = round(min(max(progress, 0.0), 1.0) * self.cfg.trainer.steps) - 1
        # A batch-wide advantage norm needs every row's pi_old before the first micro-batch trains.
        if self.fuse_old_log_prob and self.cfg.algorithm.ppo_epochs == 1 and self.cfg.algorithm.advantage_norm == "none":
            metrics["timing_s/old_log_prob"] = 0.0
            self._start_counts(b)
            with timed("train", metrics):
                old_BT = self.optimize(b, None, None, None, metrics)
            self._finish_counts()
            self.correction(b, old_BT, metrics)  # the metrics of the whole batch
            self.advantages(b, old_BT, metrics)
            return metrics
        with timed("old_log_prob", metrics):
            old_BT = self.logprobs(b)
        weights_BT = self.correction(b, old_BT, metrics)
        adv_BT = self.advantages(b, old_BT, metrics)
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
        if self.objective.advantage == "none":
            return b.mask_BT.clone()
        adv = self._advantage_BT(b.teacher_logprobs_BT, old_BT, b.mask_BT, self._outcome_B(b))
        mask = b.mask_BT
        metrics.update(advantage_metrics(adv, mask))
        if self.objective.needs_teacher_scores:
            metrics["mopd/teacher_kl"] = teacher_kl(old_BT, b.teacher_logprobs_BT, mask)
            for d in sorted(set(b.domains)):
                rows = [i for i, x in enumerate(b.domains) if x == d]
                metrics[f"mopd/teacher_kl/{d}"] = teacher_kl(old_BT[rows], b.teacher_logprobs_BT[rows], mask[rows])
        return adv

    def _outcome_B(self, b: TrainBatch) -> torch.Tensor | None:
        """The GRPO outcome advantage per row, over the whole batch's groups (None where unused)."""
        a, kind = self.cfg.algorithm, self.objective.advantage
        if kind == "orm" or (kind == "mopd" and a.alpha_orm != 0):
            return grpo_outcome_advantage(torch.nan_to_num(b.scores_B, nan=0.0), b.group_B)
        return None

    def _advantage_BT(self, teacher_BT: torch.Tensor, old_BT: torch.Tensor, mask_BT: torch.Tensor,
                      outcome_B: torch.Tensor | None) -> torch.Tensor:
        a, kind = self.cfg.algorithm, self.objective.advantage
        if kind == "none":
            return mask_BT.clone()
        if kind == "orm":
            return combine_advantages(torch.zeros_like(mask_BT), outcome_B, 1.0, mask_BT)
        a_mopd = normalize_advantage(mopd_advantage(teacher_BT, old_BT, mask_BT, clip=a.advantage_clip), mask_BT,
                                     str(a.advantage_norm))
        return combine_advantages(a_mopd, outcome_B, a.alpha_orm, mask_BT)

    def optimize(self, b: TrainBatch, old_BT: torch.Tensor | None, adv_BT: torch.Tensor | None,
                 weights_BT: torch.Tensor | None, metrics: dict[str, float]) -> torch.Tensor | None:
        """`ppo_epochs` passes over the batch in micro-batches, gradients accumulated, one step per pass.

        With several workers each takes its share of the rows; the gradients are averaged across them once per
        pass (at the last micro-batch), so the update equals the one-worker, whole-batch update. `old_BT`
        None: pi_old, the correction weights and the advantages come from each micro-batch's own forward (one
        pass only); the whole batch's pi_old is returned then."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        mask = b.mask_BT
        fused = old_BT is None
        if fused and a.ppo_epochs != 1:
            raise ValueError("pi_old from the training forward needs algorithm.ppo_epochs == 1")
        # loss_agg_mode: domain ids and normalisers of the whole batch, so that the row-weighted micro-batch
        # losses below sum to the whole-batch loss (and gradient) exactly in every mode.
        ids = {d: i for i, d in enumerate(sorted(set(b.domains)))}
        domain_B = torch.tensor([ids[d] for d in b.domains], dtype=torch.long)
        norm = agg_norm(mask, domain_B)
        batch_tokens = max(float(mask.sum()), 1.0)
        outcome_B = self._outcome_B(b) if fused else None
        old_out = torch.zeros(mask.shape) if fused else None
        grad_norm = float("nan")
        # A worker with no row (fewer rows than workers) still joins the gradient average, with a zero loss.
        mine = self._micro(b)
        micro, scale = (mine, 1.0) if mine else ([[0]], 0.0)
        for _ in range(a.ppo_epochs):
            sums: dict[str, float] = {"actor/loss": 0.0, "actor/entropy": 0.0}
            bad: list[float] = []
            for k, idx in enumerate(micro):
                mb = b.select(idx, trim=True)
                T = mb.mask_BT.shape[1]
                frac = len(idx) / b.size * scale
                cut = lambda x, idx=idx, T=T: None if x is None else x[idx][:, :T]  # noqa: E731
                with_kl = self.objective.needs_teacher_topk and mb.teacher_topk_ids_BTK is not None
                lp_BT, logp_BTV, kl, ent_BT = (self._observed if fused else self._pass)(mb, with_kl)
                if fused:
                    old_mb = lp_BT.detach()
                    if scale:
                        old_out[idx, :T] = old_mb
                    w_mb = self._weights(mb, old_mb)
                    adv_mb = self._advantage_BT(mb.teacher_logprobs_BT, old_mb, mb.mask_BT,
                                                None if outcome_B is None else outcome_B[idx])
                else:
                    old_mb, w_mb, adv_mb = cut(old_BT), cut(weights_BT), cut(adv_BT)
                x = LossInputs(lp_BT, logp_BTV, adv_mb, w_mb, cut(mask), old_mb, mb.teacher_topk_ids_BTK,
                               mb.teacher_topk_logprobs_BTK, domain_B[idx], norm, kl)
                loss, parts = self.objective.loss(x, a)
                n_tok = float(cut(mask).sum())
                for name, v in parts.items():  # token means by their share of the batch's tokens, losses by rows
                    w = n_tok / batch_tokens * scale if name in _TOKEN_MEANS else frac
                    sums[name] = sums.get(name, 0.0) + v * w
                sums["actor/loss"] += loss.item() * frac
                with torch.no_grad():  # a token mean over the whole batch: summed here, divided below
                    ent = (token_entropy(logp_BTV, cut(mask)).item() * n_tok if logp_BTV is not None
                           else float((ent_BT * cut(mask)).sum()))
                    sums["actor/entropy"] += ent * scale
                if not torch.isfinite(loss):
                    bad.append(loss.item())  # raised after the pass: every worker must reach the gradient average
                # DDP and ZeRO average the workers' gradients; the world factor makes that average a sum.
                self._backward(loss * frac * self.world, last=k == len(micro) - 1)
            totals = self._all_sum(torch.tensor([float(len(bad)), *sums.values()], dtype=torch.float64))
            sums = dict(zip(sums, totals[1:].tolist(), strict=True))
            sums["actor/entropy"] /= batch_tokens
            if totals[0] > 0:
                raise NonFiniteError(self._nan_message("loss", bad[0] if bad else float("nan")))
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
        return self._all_sum(old_out) if old_out is not None else None

    def _weights(self, b: TrainBatch, old_BT: torch.Tensor) -> torch.Tensor | None:
        """The correction weights alone (`correction` also computes the batch's diagnostics)."""
        a = self.cfg.algorithm
        if not self.objective.corrected:
            return None
        return correction_weights(str(a.correction), old_BT, b.rollout_logprobs_BT, b.mask_BT, low=a.icepop_low,
                                  high=a.icepop_high, cap=a.tis_cap)[0]

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate a micro-batch's gradient; only the last one of a pass averages across workers (DDP's
        no_sync; DeepSpeed's accumulation boundary) and, under DeepSpeed, steps the engine."""
        if self.cfg.trainer.backend == "deepspeed":
            self.acc.deepspeed_engine_wrapped.engine.set_gradient_accumulation_boundary(last)
            self.acc.gradient_state._set_sync_gradients(last)
            try:
                self.acc.backward(loss)
            finally:
                self.acc.gradient_state._set_sync_gradients(True)
            return
        with nullcontext() if last or self.world == 1 else self.acc.no_sync(self.model):
            self.acc.backward(loss)

    def _nan_message(self, what: str, value: float) -> str:
        return (f"non-finite {what} ({value}) in the trainer; no update was applied and the last checkpoint is "
                "intact. Lower trainer.lr, keep trainer.grad_clip on, or check the teacher's log-probs for NaN.")

    # -- weights out ---------------------------------------------------------------------------
    @property
    def gathers(self) -> bool:
        """Reading the weights is a collective (ZeRO-3 partitions them): every worker must take part."""
        return self.cfg.trainer.backend == "deepspeed" and self.cfg.trainer.zero_stage == 3 and self.world > 1

    def state_dict(self, trained_only: bool = False) -> dict[str, torch.Tensor]:
        """Full fp32 CPU weights (gathered under ZeRO-3) for the engines and checkpoints; under ZeRO-3 with
        several workers only rank 0 receives them (the others get {}). `trained_only`: leave out the frozen
        parameters (`trainer.freeze`), which a weight sync need not resend."""
        sd = self.acc.get_state_dict(self.model) or {}
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()
                if not (trained_only and k in self.frozen)}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights and optimizer state, both whole, so that a checkpoint loads into any number of workers.

        DeepSpeed partitions the optimizer state across the workers (and its own checkpoint can only be loaded
        by the same worker count): each parameter's Adam moments are gathered by name instead. A collective
        under DeepSpeed: every worker calls it."""
        sd = self.state_dict()
        if self.cfg.trainer.backend != "deepspeed":
            return sd, {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                        "frozen": sorted(self.frozen)}
        from deepspeed.utils import safe_get_full_optimizer_state

        moments = {}
        for name, p in self.unwrapped.named_parameters():
            if name in self.frozen:  # no optimizer state
                continue
            got = {k: safe_get_full_optimizer_state(p, k) for k in _ADAM_MOMENTS}
            moments[name] = {k: v.detach().to("cpu", torch.float32) for k, v in got.items() if v is not None}
        return sd, {"format": "mopd-full-adam/1", "moments": moments, "adam_step": self._adam_step(),
                    "scheduler": self.sched.state_dict()}

    def load_optimizer_state(self, st: dict[str, Any]) -> None:
        """The inverse of `checkpoint_state`'s optimizer half, whatever worker count wrote it."""
        self.sched.load_state_dict(st["scheduler"])
        if "optimizer" in st:  # torch's own state dict: whole on every data-parallel replica
            if self.cfg.trainer.backend == "deepspeed":
                raise ValueError("this checkpoint was written by trainer.backend=accelerate; its optimizer state "
                                 "cannot be loaded by trainer.backend=deepspeed (resume with the backend that wrote "
                                 "it, or start a new run from its model folder)")
            if sorted(st.get("frozen", [])) != sorted(self.frozen):
                raise ValueError(f"this checkpoint's optimizer state was written with trainer.freeze matching "
                                 f"{len(st.get('frozen', []))} parameters, this run's matches {len(self.frozen)}: "
                                 "resume with the trainer.freeze that wrote it (or start a new run from its model "
                                 "folder)")
            self.opt.load_state_dict(st["optimizer"])
            return
        if self.cfg.trainer.backend != "deepspeed":
            raise ValueError("this checkpoint was written by trainer.backend=deepspeed; resume it with "
                             "trainer.backend=deepspeed (or start a new run from its model folder)")
        from deepspeed.utils import safe_set_full_optimizer_state

        self._materialise_deepspeed_optimizer_state()
        dev = self.acc.device
        for name, p in self.unwrapped.named_parameters():
            if name in self.frozen:
                continue
            for k, v in st["moments"].get(name, {}).items():
                safe_set_full_optimizer_state(p, v.to(dev), k)
        base = self._deepspeed_base_optimizer()
        for state in (base.state.values() if base is not None else []):
            if "step" in state:
                state["step"] = (torch.as_tensor(float(st["adam_step"]), dtype=state["step"].dtype)
                                 if torch.is_tensor(state["step"]) else st["adam_step"])

    def _materialise_deepspeed_optimizer_state(self) -> None:
        """DeepSpeed creates Adam's state at the first step; loading into it needs one. A step at lr 0 on a zero
        loss creates zero moments and changes no weight (AdamW's decay is lr-scaled too)."""
        base = self._deepspeed_base_optimizer()
        if base is None or any(base.state.values()):
            return
        lrs = [g["lr"] for g in base.param_groups]
        for g in base.param_groups:
            g["lr"] = 0.0
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.acc.device)
        self._backward(self.model(input_ids=ids).logits.sum() * 0.0, last=True)
        for g, lr in zip(base.param_groups, lrs, strict=True):
            g["lr"] = lr

    def _deepspeed_base_optimizer(self) -> Any:
        """The torch AdamW inside DeepSpeed's ZeRO optimizer (its `state` holds the moments and step)."""
        return getattr(self.acc.deepspeed_engine_wrapped.engine.optimizer, "optimizer", None)

    def _adam_step(self) -> int:
        base = self._deepspeed_base_optimizer()
        for state in (base.state.values() if base is not None else []):
            if "step" in state:
                return int(state["step"])
        return 0

    @property
    def unwrapped(self) -> Any:
        return self.acc.unwrap_model(self.model)
