"""R3 capture: which experts every MoE layer of the vLLM student chose for every token of every sample.

The trainer replays these choices (stability/ R3) so that its forward routes exactly as the rollout
engine did. The result per sample is an int16 array `[prompt + response tokens, moe_layers, top_k]`
holding logical expert ids, or `NO_EXPERT` (-1) where the engine has no record.

Two backends behind one interface (`RoutingCapture.recording()` -> `Recording.routed_experts(outputs)`):

* ``"native"``: vLLM's own `enable_return_routed_experts` (`CompletionOutput.routed_experts`). It is
  wired only into Model Runner V2, which needs Triton, so in practice CUDA GPUs. The engine must be
  built with `routing_llm_kwargs("native")`. This branch is small and is not exercised on CPU.
* ``"hooks"``: ours, for the V1 model runner (CPU, or GPU with CUDA graphs off). Every fused-MoE
  router gets a capture callback (`BaseRouter.set_capture_fn`, called with the step's `topk_ids`
  `[rows, top_k]` once per forward per layer). The hook alone does not know which row is which
  request, so the model runner's `_prepare_inputs` is wrapped to snapshot the step's batch layout
  (persistent-batch order `input_batch.req_ids`, `num_scheduled_tokens`, `num_computed_tokens`),
  and `_model_forward` is wrapped so that only real steps (not dummy/profile runs, which call the
  model directly) are recorded. Rows of a step are laid out request by request in that order, each
  request contributing its scheduled tokens at positions `num_computed .. num_computed + scheduled`
  (a prefill chunk, a whole prompt, or one decode token). This is exactly how the runner builds
  `positions`, and each step cross-checks against the `positions` tensor the model really received.

Semantics that matter to the trainer:

* Continuous batching, `n > 1` (each child request `"<i>_<parent>-<rand>"` is prefilled on its own,
  prefix caching is off), chunked prefill and preemption are handled by keying rows on
  (request, position). A preempted request is recomputed from position 0; the later capture of a
  position overwrites the earlier one ("last write wins"), and `Stats.recomputed_rows` counts them.
* The token fed at every recorded row is recorded as well and must equal the sample's own token at
  that position; any mismatch or hole raises `RoutingCaptureError` (strict mode), because replaying
  another request's routing would silently corrupt training.
* The last sampled token is never fed through the model (generation stops after sampling it), so its
  routing does not exist. Its row is always `NO_EXPERT`, also when async scheduling happened to
  compute it, so the result does not depend on scheduling. The trainer's loss uses logits at
  positions `P-1 .. T-2` only; the last position's hidden state (and thus its routing) affects no
  loss term, so its fallback to the trainer's own router is harmless (it is counted as unreplayed).
  vLLM's native output has `T - 1` rows for the same reason; it is padded to `T` here.
* Multi-turn trajectories (mopd/multiturn.py): each turn is a new request whose prompt is the whole
  trajectory so far (prompt, earlier student turns, observations), prefilled from scratch (no prefix
  cache). A trajectory keeps the record of its *last* turn: the earlier turns and the observations are
  captured during that turn's prefill, the last turn's tokens during its decode, so one record covers
  every position with one forward of one weight version (the version that sampled the last turn; under
  the pipeline an earlier turn may have been sampled by an older one, whose routing is not kept). Only the
  final sampled token has no record, as single-turn. Tested: tests/test_multiturn_engine.py (every fed
  position recorded, trainer agreement 1.0 with replay on).

Worker-side calls go through `collective_rpc` by method name when the engine was built with
`routing_llm_kwargs()` (it adds `RoutingWorkerExtension`), so capture also works with the engine core
in another process (`VLLM_ENABLE_V1_MULTIPROCESSING=1`; checked by hand, 100% agreement); results
cross as raw bytes. Without the extension the calls are pickled callables, fine in-process only.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

NO_EXPERT = -1
ROUTING_DTYPE = np.int16  # logical expert ids; every public MoE has far fewer than 32k experts
_WORKER_ATTR = "_mopd_routing_capture"
WORKER_EXTENSION = "rollout.routing_capture.RoutingWorkerExtension"
_RANDOM_SUFFIX = re.compile(r"-[0-9a-zA-Z]{8}$")  # vLLM appends "-<8 random chars>" to request ids


class RoutingCaptureError(RuntimeError):
    """The recorded routing cannot be trusted for a sample (a bug or an unsupported engine setup)."""


def native_routing_available() -> bool:
    """Whether vLLM's own routed-experts return can work here (Model Runner V2: CUDA-alike + Triton)."""
    try:
        import vllm.envs as envs
        from vllm.platforms import current_platform
        from vllm.triton_utils import HAS_TRITON
    except ImportError:
        return False
    return bool(current_platform.is_cuda_alike() and HAS_TRITON and envs.VLLM_USE_V2_MODEL_RUNNER is not False)


def resolve_mode(mode: str = "auto") -> str:
    """"auto" picks the native backend where it can work, else the hooks; explicit modes are kept."""
    if mode not in ("auto", "native", "hooks"):
        raise ValueError(f"routing capture mode must be 'auto', 'native' or 'hooks', got {mode!r}")
    if mode == "auto":
        return "native" if native_routing_available() else "hooks"
    return mode


def routing_llm_kwargs(mode: str = "auto") -> dict[str, Any]:
    """Extra `vllm.LLM(...)` arguments a capture mode needs; pass them when building the engine.

    Hooks mode adds a worker extension so its worker-side calls go by method name: an engine-core
    process (multi-process mode) refuses pickled callables unless VLLM_ALLOW_INSECURE_SERIALIZATION=1.
    """
    extra: dict[str, Any] = {"worker_extension_cls": WORKER_EXTENSION}
    if resolve_mode(mode) == "native":
        extra["enable_return_routed_experts"] = True
    return extra


@dataclass
class Stats:
    """Bookkeeping of one recording, for logs and tests (all counts are (token) rows, not layers)."""

    samples: int = 0
    rows: int = 0  # prompt + response tokens over all samples
    replayable_rows: int = 0  # rows holding a recorded routing
    last_token_rows: int = 0  # final sampled tokens: never fed to the model, always NO_EXPERT
    missing_rows: int = 0  # other rows without a record (0 unless something is wrong)
    recomputed_rows: int = 0  # positions captured more than once (preemption recompute)
    steps: int = 0  # engine forward steps recorded


@dataclass
class Recording:
    """What one `RoutingCapture.recording()` window saw; turns vLLM outputs into per-sample arrays."""

    capture: RoutingCapture
    per_request: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    recomputed: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    errors: list[str] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)

    def routed_experts(self, outputs: Sequence[Any]) -> list[list[np.ndarray]]:
        """One `[T, layers, top_k]` int16 array per completion, in the order of `outputs[i].outputs`.

        `outputs` are the `RequestOutput`s `LLM.generate` returned inside the recording window.
        """
        cap = self.capture
        if self.errors and cap.strict:
            raise RoutingCaptureError("routing capture failed in the engine: " + "; ".join(self.errors[:5]))
        by_key = {_RANDOM_SUFFIX.sub("", rid): rid for rid in self.per_request} if cap.mode == "hooks" else {}
        stats = Stats(steps=self.steps)
        result = []
        for out in outputs:
            prompt = list(out.prompt_token_ids or [])
            group = []
            for comp in out.outputs:
                seq = np.asarray(prompt + list(comp.token_ids), dtype=np.int64)
                if cap.mode == "native":
                    arr = cap._from_native(comp.routed_experts, len(seq), out.request_id)
                else:
                    # LLM.generate ids: "<counter>" for n == 1, "<index>_<counter>" per child for n > 1.
                    key = out.request_id if len(out.outputs) == 1 else f"{comp.index}_{out.request_id}"
                    arr = self._assemble(by_key.get(key), seq, stats)
                stats.samples += 1
                stats.rows += len(seq)
                stats.last_token_rows += 1
                stats.replayable_rows += int((arr[:, 0, 0] != NO_EXPERT).sum())
                group.append(arr)
            result.append(group)
        stats.missing_rows = stats.rows - stats.replayable_rows - stats.last_token_rows
        self.stats = stats
        cap.last_stats = stats
        return result

    def _assemble(self, rid: str | None, seq: np.ndarray, stats: Stats) -> np.ndarray:
        cap = self.capture
        t = len(seq)
        arr = np.full((t, cap.num_layers, cap.top_k), NO_EXPERT, dtype=ROUTING_DTYPE)
        if rid is None:
            if cap.strict:
                raise RoutingCaptureError(f"no routing was recorded for a sample of {t} tokens")
            return arr
        rows, toks = self.per_request[rid]
        stats.recomputed_rows += self.recomputed.get(rid, 0)
        n = min(len(rows), t - 1)  # the final token was never fed through the model
        arr[:n] = rows[:n]
        seen = toks[:n] != -1
        wrong = seen & (toks[:n] != seq[:n])
        if wrong.any():
            bad = int(np.flatnonzero(wrong)[0])
            msg = (f"request {rid}: the engine fed token {int(toks[bad])} at position {bad} but the sample has "
                   f"{int(seq[bad])}; rows were attributed to the wrong request")
            if cap.strict:
                raise RoutingCaptureError(msg)
            arr[:n][wrong] = NO_EXPERT
        if cap.strict and (n < t - 1 or not seen.all()):
            holes = (t - 1) - int(seen.sum())
            raise RoutingCaptureError(f"request {rid}: {holes} of {t - 1} fed positions have no recorded routing")
        return arr


class RoutingCapture:
    """Routed-experts capture installed on one `vllm.LLM` (in-process or multi-process engine).

    Use one recording window per `generate` call (the engine must be otherwise idle):

        cap = RoutingCapture(llm)                     # after LLM(..., **routing_llm_kwargs())
        with cap.recording() as rec:
            outs = llm.generate(prompts, params)
        arrays = rec.routed_experts(outs)             # [prompt][sample] -> int16 [T, layers, top_k]

    Outside a window the hooks return at once, so other uses of the engine (teacher-style scoring,
    weight sync) neither pay for capture nor leave rows behind.
    """

    def __init__(self, llm: Any, *, mode: str = "auto", strict: bool = True) -> None:
        self.llm = llm
        self.strict = strict
        self.last_stats: Stats | None = None
        # Worker calls go by name through the worker extension when the engine has it, else as a
        # callable (fine in-process; another process needs VLLM_ALLOW_INSECURE_SERIALIZATION=1).
        cfg = llm.llm_engine.vllm_config
        self._by_name = cfg.parallel_config.worker_extension_cls == WORKER_EXTENSION
        self.mode = resolve_mode(mode)
        if self.mode == "native":
            if not cfg.aux_output_config.enable_return_routed_experts:
                raise ValueError("native routing capture needs the engine built with "
                                 "routing_llm_kwargs('native') (enable_return_routed_experts=True)")
            info = self._rpc(_worker_layer_info)[0]
        else:
            if cfg.parallel_config.pipeline_parallel_size > 1:
                raise NotImplementedError("hook-based routing capture does not merge pipeline stages")
            if getattr(cfg, "use_v2_model_runner", False):
                raise NotImplementedError("hook-based routing capture wraps the V1 model runner; on Model "
                                          "Runner V2 use mode='native'")
            cg = cfg.compilation_config.cudagraph_mode
            if cg is not None and str(getattr(cg, "name", cg)) != "NONE":
                raise ValueError("hook-based routing capture needs CUDA graphs off (enforce_eager=True): "
                                 "a graph replay does not call the Python capture hooks")
            info = self._rpc(_worker_install, strict)[0]
        self.layer_names: list[str] = info["names"]
        self.layer_ids: list[int] = info["layer_ids"]  # decoder-layer index of each captured MoE layer
        self.top_k: int = info["top_k"]
        self.num_layers = len(self.layer_names)
        if self.num_layers == 0:
            raise ValueError("routing capture found no fused-MoE layer in the model")

    @contextlib.contextmanager
    def recording(self) -> Iterator[Recording]:
        """Capture everything the engine computes inside the `with` block (idle engine assumed)."""
        rec = Recording(self)
        if self.mode == "native":
            yield rec
            return
        self._rpc(_worker_start)
        try:
            yield rec
        finally:
            payload = self._rpc(_worker_stop)[0]
            shape = (-1, self.num_layers, self.top_k)
            rec.per_request = {rid: (np.frombuffer(rows, dtype=ROUTING_DTYPE).reshape(shape),
                                     np.frombuffer(toks, dtype=np.int64))
                               for rid, (rows, toks) in payload["per_request"].items()}
            rec.recomputed = payload["recomputed"]
            rec.steps = payload["steps"]
            rec.errors = payload["errors"]

    def close(self) -> None:
        """Detach the hooks and restore the model runner (hooks mode; nothing to undo natively)."""
        if self.mode == "hooks":
            self._rpc(_worker_uninstall)

    def _rpc(self, fn: Any, *args: Any) -> list[Any]:
        if self._by_name:
            return self.llm.collective_rpc(f"mopd{fn.__name__}", args=args)
        return self.llm.collective_rpc(fn, args=args)

    def _from_native(self, routed: np.ndarray | None, t: int, request_id: str) -> np.ndarray:
        arr = np.full((t, self.num_layers, self.top_k), NO_EXPERT, dtype=ROUTING_DTYPE)
        if routed is None:
            if self.strict:
                raise RoutingCaptureError(f"vLLM returned no routed experts for request {request_id}")
            return arr
        # vLLM: [num_tokens - 1, num_hidden_layers, top_k] (all fed positions), indexed by decoder layer.
        n = min(len(routed), t - 1)
        arr[:n] = np.asarray(routed[:n])[:, self.layer_ids].astype(ROUTING_DTYPE)
        return arr


# --------------------------------------------------------------------------------------------------
# Worker side. Module-level functions so that `collective_rpc` ships them by reference, also to an
# engine-core process (multi-process mode); each receives the vLLM worker as its first argument.
# --------------------------------------------------------------------------------------------------


def _moe_routers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """(module name, router) of every fused-MoE layer, in model order."""
    found = []
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if router is not None and callable(getattr(router, "set_capture_fn", None)):
            found.append((name, router))
    return found


def _layer_index(name: str, fallback: int) -> int:
    nums = [int(p) for p in name.split(".") if p.isdigit()]
    return nums[0] if len(nums) == 1 else fallback


def _moe_layer_info(model: torch.nn.Module) -> dict[str, Any]:
    routers = _moe_routers(model)
    return {"names": [n for n, _ in routers], "layer_ids": [_layer_index(n, i) for i, (n, _) in enumerate(routers)],
            "top_k": int(routers[0][1].top_k) if routers else 0}


@dataclass
class _Step:
    """One forward's rows, being filled layer by layer by the router hooks."""

    rows: torch.Tensor  # int16 [num_rows, layers, top_k]
    fired: list[int]


@dataclass
class _Record:
    req_ids: list[str]
    counts: np.ndarray  # scheduled tokens per request, persistent-batch order
    starts: np.ndarray  # num_computed_tokens per request before this step
    rows: np.ndarray  # int16 [sum(counts), layers, top_k]
    tokens: np.ndarray  # int64 [sum(counts)], -1 where the input ids were not visible


class _WorkerRouting:
    """Lives on the model runner; records (layout, routing, tokens) of every real forward step."""

    def __init__(self, runner: Any, strict: bool) -> None:
        self.runner = runner
        self.strict = strict
        self.routers = _moe_routers(runner.get_model())
        self.top_k = int(self.routers[0][1].top_k) if self.routers else 0
        self.enabled = False
        self.pending: tuple[list[str], np.ndarray, np.ndarray] | None = None
        self.step: _Step | None = None
        self.records: list[_Record] = []
        self.errors: list[str] = []
        self.orig_prepare = runner._prepare_inputs
        self.orig_forward = runner._model_forward
        runner._prepare_inputs = self.prepare_inputs
        runner._model_forward = self.model_forward
        for i, (_, router) in enumerate(self.routers):
            router.set_capture_fn(self._hook(i))

    def uninstall(self) -> None:
        for _, router in self.routers:
            router.set_capture_fn(None)
        self.runner._prepare_inputs = self.orig_prepare
        self.runner._model_forward = self.orig_forward

    def prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *args: Any,
                       **kwargs: Any) -> Any:
        # Called by execute_model after _update_states: the persistent batch is in this step's order
        # and num_computed_tokens_cpu holds each request's first position of the step.
        if self.enabled:
            batch = self.runner.input_batch
            n = batch.num_reqs
            self.pending = (list(batch.req_ids[:n]), np.array(num_scheduled_tokens[:n], dtype=np.int64),
                            np.array(batch.num_computed_tokens_cpu[:n], dtype=np.int64))
        return self.orig_prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)

    def model_forward(self, *args: Any, **kwargs: Any) -> Any:
        layout, self.pending = self.pending, None
        if not self.enabled or layout is None:
            return self.orig_forward(*args, **kwargs)
        req_ids, counts, starts = layout
        total = int(counts.sum())
        step = _Step(torch.full((total, len(self.routers), self.top_k), NO_EXPERT, dtype=torch.int16),
                     [0] * len(self.routers))
        self.step = step
        try:
            out = self.orig_forward(*args, **kwargs)
        finally:
            self.step = None
        if any(f != 1 for f in step.fired):
            self._error(f"MoE hooks fired {step.fired} times in one step (expected once per layer); "
                        "micro-batching / sequence parallelism are not supported by hook capture")
            return out
        positions = np.repeat(starts, counts) + _ranges(counts)
        seen_pos = kwargs.get("positions")
        if isinstance(seen_pos, torch.Tensor) and seen_pos.dim() == 1:
            if not np.array_equal(seen_pos[:total].cpu().numpy(), positions):
                self._error("the batch layout snapshot disagrees with the positions fed to the model")
                return out
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.shape[0] >= total:
            tokens = ids[:total].to("cpu", torch.int64).numpy().copy()
        else:
            tokens = np.full(total, -1, dtype=np.int64)
        self.records.append(_Record(req_ids, counts, starts, step.rows.numpy(), tokens))
        return out

    def _hook(self, layer: int):
        def capture(topk_ids: torch.Tensor) -> None:
            step = self.step
            if step is None:
                return
            step.fired[layer] += 1
            n = step.rows.shape[0]
            if topk_ids.shape[0] < n or topk_ids.shape[1] != self.top_k:
                self._error(f"layer {layer}: topk_ids {tuple(topk_ids.shape)} for a step of {n} rows")
                step.fired[layer] += 1  # poison the step
                return
            step.rows[:, layer].copy_(topk_ids[:n])  # rows past n are padding
        return capture

    def _error(self, msg: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(msg)

    def take(self) -> dict[str, Any]:
        """Per request: routing [positions, layers, top_k] and fed tokens [positions] (-1 = no record),
        as raw bytes: vLLM's RPC serializer does not rebuild numpy arrays in untyped results.

        Rows are keyed by (request, position); where a position was computed more than once (a
        preempted request recomputed from scratch), the latest capture wins.
        """
        records, self.records = self.records, []
        errors, self.errors = self.errors, []
        per_request: dict[str, tuple[bytes, bytes]] = {}
        recomputed: dict[str, int] = {}
        if records:
            names: dict[str, int] = {}
            keys = np.concatenate([np.repeat([names.setdefault(r, len(names)) for r in rec.req_ids], rec.counts)
                                   for rec in records]).astype(np.int64)
            pos = np.concatenate([np.repeat(rec.starts, rec.counts) + _ranges(rec.counts) for rec in records])
            rows = np.concatenate([rec.rows for rec in records])
            toks = np.concatenate([rec.tokens for rec in records])
            order = np.lexsort((np.arange(len(keys)), pos, keys))  # by request, position, then time
            k_s, p_s = keys[order], pos[order]
            last = np.ones(len(order), dtype=bool)
            last[:-1] = (k_s[1:] != k_s[:-1]) | (p_s[1:] != p_s[:-1])
            dup = np.bincount(k_s[~last], minlength=len(names))
            sel = order[last]
            bounds = np.searchsorted(keys[sel], np.arange(len(names) + 1))
            for rid, k in names.items():
                seg = sel[bounds[k]:bounds[k + 1]]
                p = pos[seg]
                n = int(p.max()) + 1
                r = np.full((n, rows.shape[1], rows.shape[2]), NO_EXPERT, dtype=ROUTING_DTYPE)
                t = np.full(n, -1, dtype=np.int64)
                r[p] = rows[seg]
                t[p] = toks[seg]
                per_request[rid] = (r.tobytes(), t.tobytes())
                recomputed[rid] = int(dup[k])
        return {"per_request": per_request, "recomputed": recomputed, "steps": len(records), "errors": errors}


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[2, 3] -> [0, 1, 0, 1, 2]: each row's offset within its request's slice of the step."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def _runner(worker: Any) -> Any:
    runner = getattr(worker, "model_runner", None)
    if runner is None or not hasattr(runner, "_prepare_inputs") or not hasattr(runner, "_model_forward"):
        raise NotImplementedError(f"hook-based routing capture needs the V1 model runner, got {type(runner)}")
    return runner


def _worker_install(worker: Any, strict: bool) -> dict[str, Any]:
    runner = _runner(worker)
    state = getattr(runner, _WORKER_ATTR, None)
    if state is None:
        state = _WorkerRouting(runner, strict)
        setattr(runner, _WORKER_ATTR, state)
    return {"names": [n for n, _ in state.routers],
            "layer_ids": [_layer_index(n, i) for i, (n, _) in enumerate(state.routers)], "top_k": state.top_k}


def _worker_layer_info(worker: Any) -> dict[str, Any]:
    return _moe_layer_info(worker.get_model())


def _worker_start(worker: Any) -> None:
    state: _WorkerRouting = getattr(_runner(worker), _WORKER_ATTR)
    state.take()  # drop anything left by an interrupted window
    state.enabled = True


def _worker_stop(worker: Any) -> dict[str, Any]:
    state: _WorkerRouting = getattr(_runner(worker), _WORKER_ATTR)
    state.enabled = False
    state.pending = None
    return state.take()


def _worker_uninstall(worker: Any) -> None:
    runner = _runner(worker)
    state = getattr(runner, _WORKER_ATTR, None)
    if state is not None:
        state.uninstall()
        delattr(runner, _WORKER_ATTR)


class RoutingWorkerExtension:
    """Mixed into vLLM's worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`): the capture's worker
    calls by method name, which also cross into an engine-core process without pickling code."""

    def mopd_worker_install(self, strict: bool) -> dict[str, Any]:
        return _worker_install(self, strict)

    def mopd_worker_layer_info(self) -> dict[str, Any]:
        return _worker_layer_info(self)

    def mopd_worker_start(self) -> None:
        _worker_start(self)

    def mopd_worker_stop(self) -> dict[str, Any]:
        return _worker_stop(self)

    def mopd_worker_uninstall(self) -> None:
        _worker_uninstall(self)
