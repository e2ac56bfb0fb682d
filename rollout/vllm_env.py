"""Environment for vLLM engines that must be set before `import vllm`.

In-process engines (no engine-core subprocess) start in seconds and let weight sync pass tensors by
reference; an unset OpenMP thread count makes CPU throughput collapse, and several engines on one
small machine must not all spin every core.
"""

from __future__ import annotations

import os


def vllm_env(omp_threads: int = 1, bind: str = "nobind") -> dict[str, str]:
    """Variables for an engine process (pass to a Ray actor's runtime_env or apply in-process)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(omp_threads),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
    }


def apply_vllm_env(omp_threads: int = 1) -> None:
    """Set engine variables in this process, keeping any the user already exported."""
    for k, v in vllm_env(omp_threads).items():
        os.environ.setdefault(k, v)
