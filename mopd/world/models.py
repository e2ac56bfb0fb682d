"""Builders for the quickstart world's models: small dense teachers and a tiny MoE student.

Sizes are chosen for two CPU cores: a teacher must reach >= 90% on its domain in about a minute of
SFT, and the student must be an honest Qwen3-MoE (top-2 of 8 experts, every layer sparse) so that
routing replay and the MoE train/inference mismatch are exercised, while staying small enough that a
short warm-start leaves it clearly below the teachers. head_dim is 32 because vLLM's CPU attention
rejects 16. Everything is fp32: the CPU path compares trainer and engine log-probs to ~1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from mopd.world.sizes import STUDENT_SIZE, TEACHER_SIZE
from mopd.world.tokenizer import MAX_LEN, padded_vocab_size


def _common(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return dict(
        vocab_size=padded_vocab_size(tok), max_position_embeddings=MAX_LEN, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype="float32",
    )


def _finish(model: PreTrainedModel, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    # Generation must stop at <eos> in transformers and vLLM alike; both read generation_config.json.
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    return model.float()


def build_teacher(tok: PreTrainedTokenizerFast, seed: int, **overrides: Any) -> Qwen3ForCausalLM:
    """A freshly initialised dense Qwen3 teacher (~0.75M parameters with the defaults)."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(**{**_common(tok), **TEACHER_SIZE, **overrides})
    return _finish(Qwen3ForCausalLM(cfg), tok)


def build_student(tok: PreTrainedTokenizerFast, seed: int, **overrides: Any) -> Qwen3MoeForCausalLM:
    """A freshly initialised tiny Qwen3-MoE student: every layer sparse, top-2 of 8, renormalised."""
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(**{
        **_common(tok), **STUDENT_SIZE, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], **overrides,
    })
    # grouped_mm (the default when available) or eager; batched_mm is ~30x slower on CPU.
    return _finish(Qwen3MoeForCausalLM(cfg), tok)


def save_model(model: PreTrainedModel, tok: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Model + tokenizer in one folder, so `vllm.LLM(model=path)` and `from_pretrained` need nothing else."""
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
