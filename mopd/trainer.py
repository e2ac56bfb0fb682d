"""The student's trainer: recompute pi_old, apply the train/inference correction, build advantages,
take the optimizer step. accelerate on CPU and single GPU; DeepSpeed ZeRO through accelerate's plugin.

All math comes from the pure functions in `rewards/`, `stability/` and `mopd/losses.py`; this file only
moves tensors between them and the model.
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import AutoConfig, AutoModelForCausalLM

from mopd.batch import TrainBatch, split_rows
from mopd.chunked_logits import token_stats
from mopd.config import ConfigError, MopdConfig
from mopd.losses import ReverseKLTerms, agg_norm, sanitize_teacher_topk, token_entropy
from mopd.objectives import AdvantageInputs, LossInputs, get_objective
from mopd.schedules import make_lr_scheduler
from mopd.timing import timed
from mopd.trainer_backend import make_backend
from rewards.advantages import advantage_metrics, grpo_outcome_advantage
from stability.correction import correction_metrics, correction_weights
from stability.diagnostics import mismatch_metrics, teacher_kl, teacher_kl_per_turn
from stability.r3 import RoutingCounts, RoutingReplay, routing_counts


class NonFiniteError(RuntimeError):
    pass


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> set[str]:
    """Turn off the gradient of every parameter matching one of `patterns` (fnmatch); returns their names."""
    frozen = frozen_names([n for n, _ in model.named_parameters()], patterns)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return frozen


def check_freeze(patterns: list[str], model_path: str) -> None:
    """`trainer.freeze` against the student's parameter names before any actor starts (the trainer repeats it
    on the loaded model). The names come from the model built on the meta device from its config.json: no
    weights are read, and they are the names the trainer sees (a checkpoint's tensor names can differ: MoE
    experts are stored one per tensor and fused into one parameter when loaded)."""
    if not patterns:
        return
    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    frozen_names([n for n, _ in model.named_parameters()], patterns)


def frozen_names(names: list[str], patterns: list[str]) -> set[str]:
    """The parameter names `patterns` (fnmatch) freeze. A pattern that matches nothing is a typo, not a no-op:
    the error lists names to pick from; freezing every parameter is refused."""
    frozen: set[str] = set()
    for pat in patterns:
        hit = fnmatch.filter(names, pat)
        if not hit:
            sample = ", ".join(n for n in names if ".layers.0." in n or ".layers." not in n)
            raise ConfigError(f"config key 'trainer.freeze': pattern {pat!r} matches no parameter of the student; "
                              f"fix the pattern (fnmatch, e.g. '*.mlp.gate.*'); its parameters include: {sample}")
        frozen.update(hit)
    if frozen and len(frozen) == len(names):
        raise ConfigError(f"config key 'trainer.freeze': {patterns} freezes every parameter; nothing would train: "
                          "leave some out (e.g. freeze only '*.mlp.gate.*', the routers)")
    return frozen


@dataclass
class Targets:
    """Per token, what the loss is formed from: pi_old, the correction weights (None: the objective takes
    none) and the advantages, `[B, T]` each; the whole batch, or one micro-batch cut from it."""

    old_BT: torch.Tensor
    weights_BT: torch.Tensor | None
    adv_BT: torch.Tensor

    def cut(self, idx: list[int], T: int) -> Targets:
        return Targets(*(None if x is None else x[idx][:, :T] for x in (self.old_BT, self.weights_BT, self.adv_BT)))

    def put(self, idx: list[int], part: Targets) -> None:
        T = part.old_BT.shape[1]
        for whole, x in ((self.old_BT, part.old_BT), (self.weights_BT, part.weights_BT), (self.adv_BT, part.adv_BT)):
            if whole is not None and x is not None:
                whole[idx, :T] = x


class Trainer:
    def __init__(self, cfg: MopdConfig, model_path: str) -> None:
        self.cfg = cfg
        self.objective = get_objective(cfg.algorithm.objective)
        self.estimator = self.objective.estimator
        t = cfg.trainer
        torch.manual_seed(t.seed)
        self.backend = make_backend(t)
        plugin = self.backend.plugin()
        # One trainer per process owns accelerate's process-wide state (tests build several in a row).
        AcceleratorState._reset_state(reset_partial_state=True)
        # accelerate's cpu=True would drop the DeepSpeed plugin; without CUDA it picks the CPU anyway.
        # The LR schedule steps once per optimizer step whatever the worker count (accelerate would otherwise
        # step it once per process).
        self.acc = Accelerator(cpu=plugin is None and not torch.cuda.is_available(), deepspeed_plugin=plugin,
                               mixed_precision="bf16" if t.precision == "bf16" else "no",
                               step_scheduler_with_optimizer=False)
        # From the process group itself: accelerate counts one process when DeepSpeed runs on CPU.
        dist = torch.distributed
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.backend.configure(self.acc, self.world)
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
        summed across the workers), with the R3 agreement counted on this forward."""
        self._start_counts(b)
        old_BT = torch.zeros(b.mask_BT.shape)  # this worker's rows; the others' arrive by the sum below
        for idx in self._micro(b):
            mb = b.select(idx, trim=True)
            old_BT[idx, :mb.mask_BT.shape[1]] = self._observed(mb)[0]
        self._finish_counts()
        return self._all_sum(old_BT)

    # -- one optimizer step --------------------------------------------------------------------
    def step(self, b: TrainBatch, progress: float | None = None) -> dict[str, float]:
        """One update. `progress` in [0, 1] (a wall-clock schedule horizon) sets where the LR schedule is,
        instead of counting steps.

        pi_old is the training forward's own log-prob, detached, whenever the batch is passed over once and no
        batch-wide statistic of it is needed: the same weights and micro-batches give the same values as a
        separate no-grad pass, and correction weights and advantages are per token (per row for the sequence
        mask; the outcome term is formed on the whole batch first), so forming them micro-batch by micro-batch
        gives the same update. A separate pass over the whole batch first (`timing_s/old_log_prob` > 0) only
        when PPO reuses the batch (`algorithm.ppo_epochs` > 1) or the advantage estimator needs a statistic of
        the whole batch (`algorithm.advantage_norm`). Whole-batch metrics come once, from the tensors the step
        used."""
        metrics: dict[str, float] = {"timing_s/old_log_prob": 0.0}
        if progress is not None:  # LambdaLR.step() advances last_epoch by one, then evaluates the schedule
            inner = getattr(self.sched, "scheduler", self.sched)  # accelerate wraps the LambdaLR
            inner.last_epoch = round(min(max(progress, 0.0), 1.0) * self.cfg.trainer.steps) - 1
        given = None
        if self.cfg.algorithm.ppo_epochs > 1 or self.estimator.batch_wide(self.cfg.algorithm):
            with timed("old_log_prob", metrics):
                given = self.targets(b, self.logprobs(b))
        with timed("train", metrics):
            used = self.optimize(b, given, metrics)
        self._batch_metrics(b, used, metrics)
        return metrics

    def targets(self, b: TrainBatch, old_BT: torch.Tensor, outcome_B: torch.Tensor | None = None) -> Targets:
        """Correction weights and advantages of `b`'s rows from their pi_old; `outcome_B`: the rows' outcome
        advantages when `b` is a micro-batch (the groups span the whole batch)."""
        a = self.cfg.algorithm
        if outcome_B is None:
            outcome_B = self._outcome_B(b)
        weights_BT = None
        if self.objective.corrected:
            weights_BT = correction_weights(str(a.correction), old_BT, b.rollout_logprobs_BT, b.mask_BT,
                                            low=a.icepop_low, high=a.icepop_high, cap=a.tis_cap)[0]
        adv_BT = self.estimator.fn(AdvantageInputs(b.teacher_logprobs_BT, old_BT, b.mask_BT, outcome_B), a)
        return Targets(old_BT, weights_BT, adv_BT)

    def correction(self, b: TrainBatch, old_BT: torch.Tensor, metrics: dict[str, float]) -> torch.Tensor | None:
        """IcePop/TIS weights from pi_old vs the engine's mu, with their diagnostics in `metrics`."""
        t = self.targets(b, old_BT)
        self._correction_metrics(b, t, metrics)
        return t.weights_BT

    def advantages(self, b: TrainBatch, old_BT: torch.Tensor, metrics: dict[str, float]) -> torch.Tensor:
        """Per-token advantages, with their range and the teacher KL (overall and per domain) in `metrics`."""
        t = self.targets(b, old_BT)
        self._advantage_metrics(b, t, metrics)
        return t.adv_BT

    def _batch_metrics(self, b: TrainBatch, t: Targets, metrics: dict[str, float]) -> None:
        self._correction_metrics(b, t, metrics)
        self._advantage_metrics(b, t, metrics)

    def _correction_metrics(self, b: TrainBatch, t: Targets, metrics: dict[str, float]) -> None:
        a = self.cfg.algorithm
        if t.weights_BT is None:  # teacher samples: the student's engine never sampled them
            return
        metrics.update(correction_metrics(str(a.correction), t.weights_BT, t.old_BT, b.rollout_logprobs_BT,
                                          b.mask_BT))
        metrics.update(mismatch_metrics(t.old_BT, b.rollout_logprobs_BT, b.mask_BT, t.weights_BT,
                                        low=a.icepop_low, high=a.icepop_high))
        if self.r3_counts is not None:
            # r3/router_agreement: the routing the trainer's forward used vs the engine's (1.0 on replayed
            # positions with R3 on); r3/own_router_agreement: what the router itself would have picked.
            metrics.update(self.r3_applied.metrics())
            own = self.r3_counts.metrics()
            metrics["r3/own_router_agreement"] = own["r3/router_agreement"]
            metrics["r3/own_token_any_mismatch"] = own["r3/token_any_mismatch"]

    def _advantage_metrics(self, b: TrainBatch, t: Targets, metrics: dict[str, float]) -> None:
        mask = b.mask_BT
        if self.estimator.logged:
            metrics.update(advantage_metrics(t.adv_BT, mask))
        if self.objective.needs_teacher_scores:
            metrics["mopd/teacher_kl"] = teacher_kl(t.old_BT, b.teacher_logprobs_BT, mask)
            for d in sorted(set(b.domains)):
                rows = [i for i, x in enumerate(b.domains) if x == d]
                metrics[f"mopd/teacher_kl/{d}"] = teacher_kl(t.old_BT[rows], b.teacher_logprobs_BT[rows], mask[rows])
            metrics.update(teacher_kl_per_turn(t.old_BT, b.teacher_logprobs_BT, mask))

    def _outcome_B(self, b: TrainBatch) -> torch.Tensor | None:
        """The GRPO outcome advantage per row, over the whole batch's groups (None where unused)."""
        if not self.estimator.uses_outcome(self.cfg.algorithm):
            return None
        return grpo_outcome_advantage(torch.nan_to_num(b.scores_B, nan=0.0), b.group_B)

    def optimize(self, b: TrainBatch, given: Targets | None, metrics: dict[str, float]) -> Targets:
        """`ppo_epochs` passes over the batch in micro-batches, gradients accumulated, one step per pass; returns
        the whole batch's targets the passes trained on.

        With several workers each takes its share of the rows; the gradients are averaged across them once per
        pass (at the last micro-batch), so the update equals the one-worker, whole-batch update. `given` None:
        pi_old, the correction weights and the advantages come from each micro-batch's own forward (one pass
        only), and are gathered into the whole batch's."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        mask = b.mask_BT
        collect = given is None
        if collect and a.ppo_epochs != 1:
            raise ValueError("pi_old from the training forward needs algorithm.ppo_epochs == 1")
        # loss_agg_mode: domain ids and normalisers of the whole batch, so that the row-weighted micro-batch
        # losses below sum to the whole-batch loss (and gradient) exactly in every mode.
        ids = {d: i for i, d in enumerate(sorted(set(b.domains)))}
        domain_B = torch.tensor([ids[d] for d in b.domains], dtype=torch.long)
        norm = agg_norm(mask, domain_B)
        batch_tokens = max(float(mask.sum()), 1.0)
        if collect:
            self._start_counts(b)  # R3 agreement is counted on the forward that computes pi_old
            outcome_B = self._outcome_B(b)
            used = Targets(torch.zeros(mask.shape), torch.zeros(mask.shape) if self.objective.corrected else None,
                           torch.zeros(mask.shape))
        else:
            used = given
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
                mask_mb = mask[idx][:, :T]
                with_kl = self.objective.needs_teacher_topk and mb.teacher_topk_ids_BTK is not None
                lp_BT, logp_BTV, kl, ent_BT = (self._observed if collect else self._pass)(mb, with_kl)
                if collect:
                    t_mb = self.targets(mb, lp_BT.detach(), None if outcome_B is None else outcome_B[idx])
                    if scale:
                        used.put(idx, t_mb)
                else:
                    t_mb = used.cut(idx, T)
                x = LossInputs(lp_BT, logp_BTV, t_mb.adv_BT, t_mb.weights_BT, mask_mb, t_mb.old_BT,
                               mb.teacher_topk_ids_BTK, mb.teacher_topk_logprobs_BTK, domain_B[idx], norm, kl)
                loss, parts = self.objective.loss(x, a)
                n_tok = float(mask_mb.sum())
                for name, v in parts.items():  # token means by their share of the batch's tokens, losses by rows
                    w = n_tok / batch_tokens * scale if name in self.objective.token_means else frac
                    sums[name] = sums.get(name, 0.0) + v * w
                sums["actor/loss"] += loss.item() * frac
                with torch.no_grad():  # a token mean over the whole batch: summed here, divided below
                    ent = (token_entropy(logp_BTV, mask_mb).item() * n_tok if logp_BTV is not None
                           else float((ent_BT * mask_mb).sum()))
                    sums["actor/entropy"] += ent * scale
                if not torch.isfinite(loss):
                    bad.append(loss.item())  # raised after the pass: every worker must reach the gradient average
                # DDP and ZeRO average the workers' gradients; the world factor makes that average a sum.
                self.backend.backward(self.acc, self.model, loss * frac * self.world, k == len(micro) - 1,
                                      self.world)
            totals = self._all_sum(torch.tensor([float(len(bad)), *sums.values()], dtype=torch.float64))
            sums = dict(zip(sums, totals[1:].tolist(), strict=True))
            sums["actor/entropy"] /= batch_tokens
            if totals[0] > 0:
                raise NonFiniteError(self._nan_message("loss", bad[0] if bad else float("nan")))
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not math.isfinite(grad_norm) and self.backend.skips_nonfinite:
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
        if not collect:
            return used
        self._finish_counts()
        return Targets(*(None if x is None else self._all_sum(x) for x in (used.old_BT, used.weights_BT,
                                                                             used.adv_BT)))

    def _nan_message(self, what: str, value: float) -> str:
        return (f"non-finite {what} ({value}) in the trainer; no update was applied and the last checkpoint is "
                "intact. Lower trainer.lr, keep trainer.grad_clip on, or check the teacher's log-probs for NaN.")

    # -- weights and optimizer state out -------------------------------------------------------
    @property
    def gathers(self) -> bool:
        """Reading the weights is a collective (ZeRO-3 partitions them): every worker must take part."""
        return self.backend.gathers(self.world)

    def state_dict(self, trained_only: bool = False) -> dict[str, torch.Tensor]:
        """Full fp32 CPU weights (gathered under ZeRO-3) for the engines and checkpoints; under ZeRO-3 with
        several workers only rank 0 receives them (the others get {}). `trained_only`: leave out the frozen
        parameters (`trainer.freeze`), which a weight sync need not resend."""
        sd = self.acc.get_state_dict(self.model) or {}
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()
                if not (trained_only and k in self.frozen)}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights and optimizer state, both whole, so that a checkpoint loads into any number of workers (a
        collective under DeepSpeed: every worker calls it)."""
        return self.state_dict(), self.backend.optimizer_state(self)

    def load_optimizer_state(self, st: dict[str, Any]) -> None:
        """The inverse of `checkpoint_state`'s optimizer half, whatever worker count wrote it."""
        self.backend.load_optimizer_state(self, st)

    def load_legacy_state(self, folder: str) -> None:
        """An accelerate `save_state` folder (mopd <= 0.14's DeepSpeed checkpoints)."""
        self.backend.load_legacy(self.acc, folder)

    @property
    def unwrapped(self) -> Any:
        return self.acc.unwrap_model(self.model)
