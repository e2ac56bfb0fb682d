"""What a rollout returns per sample; plain data so it crosses Ray and process boundaries cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    # The engine's log-prob of each sampled token (mu), pre-temperature.
    rollout_logprobs: list[float]
    finish_reason: str
    # R3: routed experts per token, int array [prompt+response tokens, layers, top_k]; None when off.
    routed_experts: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    # The engine's weight version when it sampled this (the trainer's step count after its last sync): the
    # behaviour policy whose log-probs are `rollout_logprobs`. None: not sampled by the student's engine.
    policy_version: int | None = None
    # Who wrote each response token (multi-turn rollouts): 1 = the student sampled it, 0 = the environment's
    # observation (context only: no loss, no advantage, no teacher term, no metric; its rollout log-prob is a
    # 0.0 placeholder). None: every response token is the student's (single-turn rows).
    student_mask: list[int] | None = None

    def student_mask_or_ones(self) -> list[int]:
        return [1] * len(self.response_ids) if self.student_mask is None else self.student_mask


@dataclass
class EngineSpec:
    """Everything that shapes one vLLM engine actor, built once from the config and passed whole, so a new
    engine setting is one field here rather than an argument threaded through three layers."""

    model_path: str
    dtype: str = "float32"
    max_model_len: int = 128
    seed: int = 0
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    omp_threads: int = 1  # OpenMP threads of the engine's process (CPU)
    kv_cache_gb: float = 1.0  # the KV cache's size on CPU (GiB; on GPU gpu_memory_utilization sizes it)
    num_cpus: float = 1.0  # the actor's Ray resources (its placement-group bundle)
    num_gpus: float = 0.0
    capture_routing: bool = False  # students: return routed experts (R3)
    max_top_k: int = 0  # teachers: the top-k log-probs they must return (-1: the whole vocabulary)
    max_restarts: int = 0  # Ray restarts a dead engine this often (its in-flight calls fail; the caller redoes)
    tensor_parallel_size: int = 1  # vLLM's: the engine's model split over this many devices of its bundle

    def engine_kwargs(self) -> dict:
        """Keyword arguments of the engine classes' constructors (besides the model path)."""
        return {"dtype": self.dtype, "max_model_len": self.max_model_len, "seed": self.seed,
                "enforce_eager": self.enforce_eager, "gpu_memory_utilization": self.gpu_memory_utilization,
                "omp_threads": self.omp_threads, "kv_cache_gb": self.kv_cache_gb,
                "tensor_parallel_size": self.tensor_parallel_size}
