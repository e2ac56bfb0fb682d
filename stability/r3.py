"""R3: Rollout Routing Replay for transformers MoE students (Ma et al., arXiv 2510.11370).

Why: the rollout engine (vLLM kernels, maybe bf16) and the trainer (transformers) compute slightly
different router logits, so near-tied tokens pick different experts in the two. A routing flip swaps
an expert's whole output, which makes ``pi_old / mu`` explode for those tokens. R3 removes that source
of mismatch: during the trainer's forward every MoE router is *forced* to the experts the engine
recorded for each token. The gate weights are not copied from the engine: they are the training
router's own probabilities at the recorded experts (softmax of the training logits, gathered at the
recorded ids, renormalised over them exactly when the model's own top-k normalisation does), so the
router still receives gradient.

How (no transformers code is copied): each supported router (``Qwen3MoeTopKRouter`` & co.) returns
``(router_logits, router_scores, router_indices)`` and its MoE block feeds ``scores``/``indices`` to
the experts. A forward hook on the router, installed only while :meth:`RoutingReplay.context` is
active, keeps the router's logits, swaps the indices for the recorded ones and recomputes the scores
from those logits. The router's own top-k (from the training logits) is still computed by the
original forward and kept, so routing agreement is measurable with replay on. Hooks are removed on
exit, so the model is exactly restored.

Per-family normalisation, read from transformers 5.19 (all compute ``softmax(logits.float())`` over
all experts, then top-k of the probabilities):

* Qwen3-MoE, Qwen2-MoE, OLMoE: renormalise over the top-k iff ``router.norm_topk_prob`` (note: the
  transformers *config default is False* for all three; real Qwen3-MoE checkpoints set True; OLMoE
  checkpoints keep False), then cast to the logits' dtype;
* Mixtral: always renormalises, and keeps the scores in fp32.

With renormalisation the replayed weights equal ``softmax`` over the recorded experts' logits only;
without it they are the full-softmax probabilities at the recorded experts (what the model itself
would use had its top-k picked them). The scores are cast to whatever dtype the router's own scores
have, so the family's dtype handling is preserved without reimplementing it.

Records: ``routed_experts_BLNK`` int ``[B, L, N, K]`` aligned with ``input_ids_BL`` (N = MoE layers in
model order, K = top_k). A (token, layer) decision whose K ids are not all >= 0 (e.g. -1: not
recorded) falls back to the router's own top-k and is counted; so does every decision when the record
is None. Positions where ``attention_mask_BL`` is 0 are replayed if recorded but never counted.

Not supported (clear errors): gradient checkpointing while training (its recompute in backward runs
after the context has exited, with the router's own routing, so gradients would silently be wrong),
and records whose shape does not match the forward's ``[B, L]``.

Metrics (pure functions, names as in DESIGN.md): ``r3/router_agreement`` = fraction of recorded
(token, layer) decisions where the trainer's own top-k *set* equals the recorded set;
``r3/token_any_mismatch`` = fraction of recorded tokens whose sets differ in at least one layer;
``r3/replayed_frac`` = fraction of valid tokens recorded at every MoE layer. A ratio with an empty
denominator is NaN (the JSONL sink writes it as null) rather than a misleading 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "R3_METRIC_NAMES",
    "SUPPORTED_ROUTERS",
    "Capture",
    "ReplayStats",
    "RoutingCounts",
    "RoutingReplay",
    "UnsupportedMoEError",
    "r3_metrics",
    "replayed_frac",
    "router_agreement",
    "routing_counts",
    "token_any_mismatch",
]

R3_METRIC_NAMES = ("r3/router_agreement", "r3/token_any_mismatch", "r3/replayed_frac")


# -- adapters ------------------------------------------------------------------------------------
# Router class name -> "does this router renormalise its top-k probabilities?". Every listed router
# computes softmax(logits.float()) over all experts, takes the top-k of those probabilities and returns
# (router_logits, router_scores, router_indices) -- checked against transformers 5.19's source. A family
# with another scheme (sigmoid scores, bias-corrected or grouped top-k, softmax *after* top-k as in
# gpt-oss, sparsemixer as in PhiMoE) needs its own entry with its own score function, not a name here.
def _norm_attr(router: nn.Module) -> bool:
    return bool(router.norm_topk_prob)


def _always(router: nn.Module) -> bool:
    return True


SUPPORTED_ROUTERS: dict[str, Callable[[nn.Module], bool]] = {
    "Qwen3MoeTopKRouter": _norm_attr,
    "Qwen2MoeTopKRouter": _norm_attr,
    "OlmoeTopKRouter": _norm_attr,
    "MixtralTopKRouter": _always,
}


class UnsupportedMoEError(ValueError):
    """The model has no MoE router R3 knows how to replay."""


def _looks_like_router(m: nn.Module) -> bool:
    name = type(m).__name__
    return name.endswith("Router") or "TopKRouter" in name or (
        hasattr(m, "top_k") and (hasattr(m, "num_experts") or hasattr(m, "num_local_experts"))
        and not isinstance(m, nn.ModuleList))


def _find_routers(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """Supported routers in module (= layer) order, as (qualified name, module, renormalises)."""
    found, unknown = [], []
    for name, m in model.named_modules():
        kind = type(m).__name__
        if kind in SUPPORTED_ROUTERS:
            found.append((name, m, SUPPORTED_ROUTERS[kind](m)))
        elif _looks_like_router(m) and not any(name.startswith(f + ".") for f, _, _ in found):
            unknown.append(f"{kind} ({name})")
    supported = ", ".join(SUPPORTED_ROUTERS)
    if unknown:
        raise UnsupportedMoEError(
            f"R3 replay has no adapter for router class {unknown[0]}"
            + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f" in {type(model).__name__}; supported routers: {supported}. Add an adapter in "
            "stability/r3.py after checking how that router computes its scores, or turn algorithm.r3 off.")
    if not found:
        raise UnsupportedMoEError(
            f"R3 replay found no MoE router in {type(model).__name__} (is it a dense model?); supported "
            f"routers: {supported}. Turn algorithm.r3 off for dense students.")
    return found


# -- metrics (pure) ------------------------------------------------------------------------------
def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


@dataclass
class RoutingCounts:
    """Integer counts behind the r3/* metrics. Additive, so micro-batches (even of different L) merge
    exactly with ``+`` before the ratios are taken."""

    valid_tokens: int = 0
    replayed_tokens: int = 0  # valid tokens recorded at every MoE layer
    recorded_decisions: int = 0  # valid (token, layer) pairs with a full record
    agreeing_decisions: int = 0  # ... of which the trainer's own top-k set equals the record
    recorded_tokens: int = 0  # valid tokens recorded at >= 1 layer
    mismatched_tokens: int = 0  # ... of which at least one recorded layer disagrees

    def __add__(self, other: RoutingCounts) -> RoutingCounts:
        return RoutingCounts(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def metrics(self) -> dict[str, float]:
        """The three r3/* metrics (NaN where the denominator is empty)."""
        return {
            "r3/router_agreement": _ratio(self.agreeing_decisions, self.recorded_decisions),
            "r3/token_any_mismatch": _ratio(self.mismatched_tokens, self.recorded_tokens),
            "r3/replayed_frac": _ratio(self.replayed_tokens, self.valid_tokens),
        }


def _check_shapes(recorded_BLNK: Tensor, valid_BL: Tensor, own_BLNK: Tensor | None = None) -> None:
    if recorded_BLNK.dim() != 4 or recorded_BLNK.shape[:2] != valid_BL.shape:
        raise ValueError(f"recorded experts must be [B, L, layers, top_k] over valid_BL {tuple(valid_BL.shape)}, "
                         f"got {tuple(recorded_BLNK.shape)}")
    if own_BLNK is not None and own_BLNK.shape != recorded_BLNK.shape:
        raise ValueError(f"own {tuple(own_BLNK.shape)} and recorded {tuple(recorded_BLNK.shape)} experts differ "
                         "in shape")


def routing_counts(own_BLNK: Tensor, recorded_BLNK: Tensor, valid_BL: Tensor) -> RoutingCounts:
    """Counts comparing the trainer's own top-k with the engine's record. Expert order inside the top-k
    is irrelevant (sets are compared); a decision counts as recorded only if all K ids are >= 0."""
    _check_shapes(recorded_BLNK, valid_BL, own_BLNK)
    valid_BL = valid_BL.bool()
    rec_BLN = (recorded_BLNK >= 0).all(-1) & valid_BL[..., None]
    same_BLN = (own_BLNK.sort(-1).values == recorded_BLNK.to(own_BLNK.dtype).sort(-1).values).all(-1)
    return RoutingCounts(
        valid_tokens=int(valid_BL.sum()),
        replayed_tokens=int((rec_BLN.all(-1) & valid_BL).sum()),
        recorded_decisions=int(rec_BLN.sum()),
        agreeing_decisions=int((rec_BLN & same_BLN).sum()),
        recorded_tokens=int(rec_BLN.any(-1).sum()),
        mismatched_tokens=int((rec_BLN & ~same_BLN).any(-1).sum()),
    )


def router_agreement(own_BLNK: Tensor, recorded_BLNK: Tensor, valid_BL: Tensor) -> float:
    """Fraction of recorded valid (token, layer) decisions where own top-k set == recorded set."""
    return routing_counts(own_BLNK, recorded_BLNK, valid_BL).metrics()["r3/router_agreement"]


def token_any_mismatch(own_BLNK: Tensor, recorded_BLNK: Tensor, valid_BL: Tensor) -> float:
    """Fraction of recorded valid tokens whose own top-k set differs from the record in >= 1 layer."""
    return routing_counts(own_BLNK, recorded_BLNK, valid_BL).metrics()["r3/token_any_mismatch"]


def replayed_frac(recorded_BLNK: Tensor, valid_BL: Tensor) -> float:
    """Fraction of valid tokens with a full record at every MoE layer (the rest fell back, fully or
    partly, to the trainer's own routing)."""
    _check_shapes(recorded_BLNK, valid_BL)
    valid_BL = valid_BL.bool()
    full_BL = (recorded_BLNK >= 0).all(-1).all(-1) & valid_BL
    return _ratio(int(full_BL.sum()), int(valid_BL.sum()))


def r3_metrics(own_BLNK: Tensor, recorded_BLNK: Tensor, valid_BL: Tensor) -> dict[str, float]:
    """All three r3/* metrics for one batch."""
    return routing_counts(own_BLNK, recorded_BLNK, valid_BL).metrics()


# -- replay --------------------------------------------------------------------------------------
@dataclass
class ReplayStats:
    """One forward under :meth:`RoutingReplay.context`. ``own_BLNK`` is the router's own top-k from the
    training logits (computed even while replaying); ``recorded_BLNK`` is the record (None if none was
    given); ``valid_BL`` the attention mask as bool."""

    own_BLNK: Tensor
    recorded_BLNK: Tensor | None
    valid_BL: Tensor
    fallback_tokens: int  # valid tokens that used their own routing at >= 1 layer
    fallback_decisions: int  # valid (token, layer) decisions that used their own routing
    counts: RoutingCounts  # the router's own choice vs the record
    applied_counts: RoutingCounts  # the routing the forward actually used vs the record

    def metrics(self) -> dict[str, float]:
        return self.counts.metrics()


@dataclass
class Capture:
    """Filled by :meth:`RoutingReplay.capture` after the forward: the model's own top-k per MoE layer."""

    experts_BLNK: Tensor | None = None


@dataclass
class _Session:
    recorded_BLNK: Tensor | None
    replay: bool
    shape_BL: tuple[int, int] | None = None
    own: dict[int, Tensor] = field(default_factory=dict)
    applied: dict[int, Tensor] = field(default_factory=dict)  # the indices the forward actually used


class RoutingReplay:
    """Forces a transformers MoE model's routers to recorded experts for one forward at a time.

    Build once per model (``RoutingReplay(model)``; an accelerate/DeepSpeed wrapper works too, the hooks
    go on the inner modules), then wrap each forward in :meth:`context`. Nothing is changed on the model
    outside a context.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        found = _find_routers(model)
        self.router_names = [n for n, _, _ in found]
        self.routers = [m for _, m, _ in found]
        self._renorm = [r for _, _, r in found]
        tops = {int(m.top_k) for m in self.routers}
        experts = {int(getattr(m, "num_experts", 0)) for m in self.routers}
        if len(tops) != 1 or len(experts) != 1:
            raise UnsupportedMoEError(f"R3 replay needs one top_k and one expert count across layers, got "
                                      f"top_k {sorted(tops)}, experts {sorted(experts)}")
        self.top_k, self.num_experts = tops.pop(), experts.pop()
        self._session: _Session | None = None
        self._last: ReplayStats | None = None
        self._last_mask: Tensor | None = None

    @property
    def num_layers(self) -> int:
        """Number of MoE layers (the N of ``[B, L, N, K]``)."""
        return len(self.routers)

    # -- hooks -----------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Learns [B, L] of this forward (the router only sees flattened rows) and checks the record."""
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("R3 replay needs input_ids or inputs_embeds passed to the model's forward")
        s = self._session
        assert s is not None
        s.shape_BL = (int(x.shape[0]), int(x.shape[1]))
        s.own.clear()
        if s.recorded_BLNK is not None and tuple(s.recorded_BLNK.shape[:2]) != s.shape_BL:
            raise ValueError(f"routed experts {tuple(s.recorded_BLNK.shape)} do not match this forward's "
                             f"[B, L] = {list(s.shape_BL)}; they must be aligned with input_ids_BL")

    def _router_hook(self, layer: int) -> Callable[[nn.Module, Any, Any], Any]:
        renorm = self._renorm[layer]

        def hook(module: nn.Module, args: Any, output: tuple[Tensor, Tensor, Tensor]) -> Any:
            s = self._session
            if s is None:
                return None
            logits, own_scores, own_idx = output
            s.own[layer] = own_idx.detach()
            if not s.replay or s.recorded_BLNK is None:
                return None
            rec = s.recorded_BLNK[:, :, layer].reshape(-1, self.top_k).to(own_idx.device)
            if rec.shape[0] != own_idx.shape[0]:
                raise ValueError(f"router {self.router_names[layer]} saw {own_idx.shape[0]} rows but the record "
                                 f"has {rec.shape[0]} (= B*L); packed or cached inputs are not supported")
            has_BK = (rec >= 0).all(-1, keepdim=True)
            idx = torch.where(has_BK, rec, own_idx)
            s.applied[layer] = idx.detach()
            # Same arithmetic as the routers: softmax over all experts in fp32, pick, maybe renormalise.
            w = torch.softmax(logits.float(), dim=-1).gather(-1, idx)
            if renorm:
                w = w / w.sum(dim=-1, keepdim=True)
            return logits, w.to(own_scores.dtype), idx

        return hook

    @contextmanager
    def _hooks(self, session: _Session) -> Iterator[None]:
        if self._session is not None:
            raise RuntimeError("R3 replay contexts cannot be nested")
        handles = [self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)]
        try:
            handles += [r.register_forward_hook(self._router_hook(i)) for i, r in enumerate(self.routers)]
            self._session = session
            yield
        finally:
            self._session = None
            for h in handles:
                h.remove()

    def _own_BLNK(self, s: _Session, which: str = "own") -> Tensor:
        per_layer = getattr(s, which)
        if s.shape_BL is None or len(per_layer) != self.num_layers:
            raise RuntimeError(f"no complete forward ran inside the R3 context (saw {len(per_layer)} of "
                               f"{self.num_layers} MoE layers)")
        B, L = s.shape_BL
        own = torch.stack([per_layer[i].reshape(B, L, self.top_k) for i in range(self.num_layers)], dim=2)
        return own.long().cpu()

    # -- public ----------------------------------------------------------------------------------
    @contextmanager
    def context(self, routed_experts_BLNK: Tensor | None, attention_mask_BL: Tensor) -> Iterator[None]:
        """Replay ``routed_experts_BLNK`` (int ``[B, L, N, K]``, -1 = not recorded; None = nothing recorded,
        everything falls back) during the forward(s) inside; afterwards :meth:`last_stats` describes the
        last one. ``attention_mask_BL`` decides which positions are counted (0 = padding)."""
        rec = None
        if routed_experts_BLNK is not None:
            rec = routed_experts_BLNK.long()
            want = (self.num_layers, self.top_k)
            if rec.dim() != 4 or tuple(rec.shape[2:]) != want or rec.shape[:2] != attention_mask_BL.shape:
                raise ValueError(f"routed experts must be [B, L, {want[0]} MoE layers, top_k {want[1]}] aligned "
                                 f"with attention_mask_BL {tuple(attention_mask_BL.shape)}, got {tuple(rec.shape)}")
            if rec.numel() and (int(rec.min()) < -1 or int(rec.max()) >= self.num_experts):
                raise ValueError(f"routed expert ids must be in [-1, {self.num_experts}), got "
                                 f"[{int(rec.min())}, {int(rec.max())}]")
            if torch.is_grad_enabled() and any(
                    getattr(m, "gradient_checkpointing", False) is True and m.training for m in self.model.modules()):
                raise RuntimeError("R3 replay does not work with gradient checkpointing while training: the "
                                   "recompute in backward would route with the model's own choice. Disable "
                                   "gradient checkpointing or algorithm.r3.")
        session = _Session(recorded_BLNK=rec, replay=True)
        self._last = None
        with self._hooks(session):
            yield
        own = self._own_BLNK(session)
        valid = attention_mask_BL.detach().cpu().bool()
        if tuple(valid.shape) != tuple(own.shape[:2]):
            raise ValueError(f"attention_mask_BL {tuple(valid.shape)} does not match the forward's [B, L] "
                             f"{tuple(own.shape[:2])}")
        rec_cpu = None if rec is None else rec.cpu()
        if rec_cpu is None:
            counts = RoutingCounts(valid_tokens=int(valid.sum()))
            fb_BLN = valid[..., None].expand(-1, -1, self.num_layers)
            applied_counts = counts
        else:
            counts = routing_counts(own, rec_cpu, valid)
            applied_counts = routing_counts(self._own_BLNK(session, "applied"), rec_cpu, valid)
            fb_BLN = ~(rec_cpu >= 0).all(-1) & valid[..., None]
        self._last = ReplayStats(own, rec_cpu, valid, fallback_tokens=int(fb_BLN.any(-1).sum()),
                                 fallback_decisions=int(fb_BLN.sum()), counts=counts,
                                 applied_counts=applied_counts)

    def last_stats(self) -> ReplayStats:
        """Stats of the last forward run under :meth:`context` (raises if there was none)."""
        if self._last is None:
            raise RuntimeError("no R3 replay forward has completed yet")
        return self._last

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record the model's own top-k per MoE layer (no replay) as ``[B, L, N, K]`` int64 on CPU, for
        the last forward inside; an independent reference for tests and diagnostics."""
        session = _Session(recorded_BLNK=None, replay=False)
        cap = Capture()
        with self._hooks(session):
            yield cap
        cap.experts_BLNK = self._own_BLNK(session)
