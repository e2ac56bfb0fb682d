"""Tiny real model folders for tests that need a student and a teacher on disk but no world or engine."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from mopd.world.models import build_student, build_teacher, save_model
from mopd.world.tokenizer import build_tokenizer


def save_tiny_models(d: Path):
    """`d/student` (Qwen3-MoE) and `d/teacher` (dense Qwen3) with the world's tokenizer; returns the tokenizer."""
    tok = build_tokenizer()
    save_model(build_student(tok, seed=0), tok, d / "student")
    save_model(build_teacher(tok, seed=1), tok, d / "teacher")
    return tok


def set_weight(folder: Path, name: str, value: float = float("nan"), index: int = 3) -> None:
    """Corrupt one element of one tensor of a saved model (what a bad export or a bit flip leaves)."""
    f = folder / "model.safetensors"
    state = load_file(str(f))
    state[name] = state[name].clone()
    state[name].view(-1)[index] = value
    save_file(state, str(f), metadata={"format": "pt"})
