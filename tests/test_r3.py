"""R3 routing replay on tiny real transformers MoE models (no mocks): replaying the model's own choice is
a no-op, replaying other choices changes outputs yet keeps router gradients, the gate weights are the
training softmax at the recorded experts (renormalised as each family does), -1 falls back and is
counted, the model is restored afterwards, and unsupported models are refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

from stability.r3 import (
    R3_METRIC_NAMES,
    RoutingCounts,
    RoutingReplay,
    UnsupportedMoEError,
    r3_metrics,
    replayed_frac,
    router_agreement,
    token_any_mismatch,
)

E, K, B, L = 8, 2, 2, 10
COMMON = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              head_dim=32, num_experts_per_tok=K)


def _qwen3(norm: bool = True):
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, num_experts=E, moe_intermediate_size=32,
                                              intermediate_size=64, norm_topk_prob=norm))


def _mixtral():
    return MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=E, intermediate_size=32))


def _olmoe():  # norm_topk_prob=False: OLMoE's own default, the un-renormalised branch
    return OlmoeForCausalLM(OlmoeConfig(**COMMON, num_experts=E, intermediate_size=32, norm_topk_prob=False))


def _qwen2():
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, num_experts=E, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=32, intermediate_size=64,
                                              norm_topk_prob=True))


FAMILIES = {"qwen3_moe": _qwen3, "mixtral": _mixtral, "olmoe": _olmoe, "qwen2_moe": _qwen2}
RENORM = {"qwen3_moe": True, "mixtral": True, "olmoe": False, "qwen2_moe": True}


def _build(name: str):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    # Spread the router logits so near-ties (which would make "own" choices fragile) are unlikely.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0, 1.0)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -3:] = 0  # right padding on the second row
    return ids, mask


def _random_experts(shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    """K distinct experts per (token, layer), uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, E, generator=g).argsort(-1)[..., :K]


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    return request.param, _build(request.param)


def test_finds_routers_in_layer_order(fam):
    name, model = fam
    r = RoutingReplay(model)
    assert r.num_layers == 2 and r.top_k == K and r.num_experts == E
    assert [n.split(".")[2] for n in r.router_names] == ["0", "1"]


def test_replaying_own_choice_is_a_noop(fam):
    _, model = fam
    r = RoutingReplay(model)
    ids, mask = _batch()
    with torch.no_grad(), r.capture() as cap:
        ref = _logits(model, ids, mask)
    own = cap.experts_BLNK
    assert own.shape == (B, L, 2, K) and own.dtype == torch.long
    with torch.no_grad(), r.context(own, mask):
        out = _logits(model, ids, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    st = r.last_stats()
    assert torch.equal(st.own_BLNK, own)
    m = st.metrics()
    assert m == {"r3/router_agreement": 1.0, "r3/token_any_mismatch": 0.0, "r3/replayed_frac": 1.0}
    assert st.fallback_tokens == 0 and st.fallback_decisions == 0


def test_replaying_other_choices_changes_output_and_keeps_router_gradient(fam):
    _, model = fam
    r = RoutingReplay(model)
    ids, mask = _batch()
    with torch.no_grad(), r.capture() as cap:
        ref = _logits(model, ids, mask)
    rec = _random_experts((B, L, 2))
    model.zero_grad()
    with r.context(rec, mask):
        out = _logits(model, ids, mask)
    assert (out - ref).abs().max() > 1e-3
    out.float().logsumexp(-1).mean().backward()
    for router in r.routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    model.zero_grad()
    st = r.last_stats()
    # The own choice was still computed from the training logits: layer 0 sees the same inputs as the
    # plain forward, so its own top-k is exactly the captured one.
    assert torch.equal(st.own_BLNK[:, :, 0], cap.experts_BLNK[:, :, 0])
    assert st.metrics()["r3/router_agreement"] < 0.5
    assert st.metrics()["r3/replayed_frac"] == 1.0


def test_gate_weights_are_training_softmax_over_recorded_experts(fam):
    name, model = fam
    r = RoutingReplay(model)
    ids, mask = _batch()
    rec = _random_experts((B, L, 2), seed=3)
    block = model.model.layers[0].mlp
    seen = {}
    h = block.experts.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], idx=args[1], w=args[2]))
    try:
        with torch.no_grad(), r.context(rec, mask):
            _logits(model, ids, mask)
    finally:
        h.remove()
    logits = seen["x"] @ block.gate.weight.T  # the training router logits, by hand
    chosen = rec[:, :, 0].reshape(-1, K)
    assert torch.equal(seen["idx"], chosen)
    if RENORM[name]:
        want = torch.softmax(logits.gather(-1, chosen), -1)  # softmax over the recorded experts only
    else:
        want = torch.softmax(logits, -1).gather(-1, chosen)  # full softmax, no renormalisation
    torch.testing.assert_close(seen["w"].float(), want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(want.sum(-1), torch.ones(B * L)) or RENORM[name]


def test_missing_records_fall_back_to_own_choice_and_are_counted(fam):
    _, model = fam
    r = RoutingReplay(model)
    ids, mask = _batch()
    with torch.no_grad(), r.capture() as cap:
        ref = _logits(model, ids, mask)
    rec = cap.experts_BLNK.clone()
    rec[0, :3] = -1  # three prompt tokens without any record (all layers)
    rec[1, 4, 1, 0] = -1  # one partial record: that (token, layer) falls back
    rec[1, -2:] = -1  # padding without record: replayed or not, never counted
    with torch.no_grad(), r.context(rec, mask):
        out = _logits(model, ids, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)  # fallback = the model's own routing
    st = r.last_stats()
    assert st.fallback_tokens == 4 and st.fallback_decisions == 3 * 2 + 1
    n_valid = int(mask.sum())
    assert st.counts.valid_tokens == n_valid
    assert st.metrics()["r3/replayed_frac"] == pytest.approx((n_valid - 4) / n_valid)
    # no record at all: everything falls back, nothing is replayed
    with torch.no_grad(), r.context(None, mask):
        out = _logits(model, ids, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    st = r.last_stats()
    assert st.fallback_tokens == n_valid and st.fallback_decisions == 2 * n_valid
    assert torch.equal(st.own_BLNK, cap.experts_BLNK)
    assert st.metrics()["r3/replayed_frac"] == 0.0 and math.isnan(st.metrics()["r3/router_agreement"])


def test_context_restores_the_model(fam):
    _, model = fam
    r = RoutingReplay(model)
    ids, mask = _batch()
    with torch.no_grad():
        before = _logits(model, ids, mask)
        with r.context(_random_experts((B, L, 2)), mask):
            _logits(model, ids, mask)
        after = _logits(model, ids, mask)
    assert torch.equal(before, after)
    assert not model._forward_pre_hooks and all(not m._forward_hooks for m in r.routers)
    # also after a failing forward inside the context
    with pytest.raises(ValueError, match="aligned with input_ids"), r.context(_random_experts((B, L, 2)), mask):
        _logits(model, ids[:, :-1], mask[:, :-1])
    assert not model._forward_pre_hooks and all(not m._forward_hooks for m in r.routers)
    with torch.no_grad():
        assert torch.equal(_logits(model, ids, mask), before)


def test_bad_records_are_refused():
    model = _build("qwen3_moe")
    r = RoutingReplay(model)
    _, mask = _batch()
    with pytest.raises(ValueError, match=r"\[B, L, 2 MoE layers, top_k 2\]"), r.context(torch.zeros(B, L, 3, K), mask):
        pass
    with pytest.raises(ValueError, match=r"in \[-1, 8\)"), r.context(torch.full((B, L, 2, K), 8), mask):
        pass
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"), r.context(_random_experts((B, L, 2)), mask):
        pass


def test_unsupported_models_are_refused_by_name():
    dense = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"},
                                         intermediate_size=64))
    with pytest.raises(UnsupportedMoEError, match="no MoE router in Qwen3ForCausalLM"):
        RoutingReplay(dense)
    cfg = GptOssConfig(hidden_size=64, num_local_experts=E, num_experts_per_tok=K)
    foreign = torch.nn.Sequential(torch.nn.Linear(64, 64), GptOssTopKRouter(cfg))
    with pytest.raises(UnsupportedMoEError, match=r"GptOssTopKRouter \(1\).*Qwen3MoeTopKRouter"):
        RoutingReplay(foreign)


# -- pure metrics on hand-built arrays -------------------------------------------------------------
def test_metrics_by_hand():
    # B=1, L=4 tokens, N=2 layers, K=2
    rec = torch.tensor([[[[0, 1], [2, 3]],      # t0: both layers recorded
                         [[4, 5], [6, 7]],      # t1
                         [[-1, -1], [1, 2]],    # t2: layer 0 not recorded
                         [[0, 1], [0, 1]]]])    # t3: padding
    own = torch.tensor([[[[1, 0], [2, 3]],      # t0: same sets (order differs) -> agree, agree
                         [[4, 5], [6, 0]],      # t1: layer 1 differs
                         [[3, 4], [2, 1]],      # t2: layer 1 agrees (layer 0 unrecorded, not counted)
                         [[5, 6], [5, 6]]]])    # t3: padding, ignored
    valid = torch.tensor([[1, 1, 1, 0]])
    # recorded valid decisions: t0 x2, t1 x2, t2 x1 = 5; agreeing: t0 x2, t1 x1, t2 x1 = 4
    assert router_agreement(own, rec, valid) == pytest.approx(4 / 5)
    # recorded tokens t0, t1, t2; mismatching: t1 only
    assert token_any_mismatch(own, rec, valid) == pytest.approx(1 / 3)
    # fully recorded valid tokens: t0, t1 of 3
    assert replayed_frac(rec, valid) == pytest.approx(2 / 3)
    m = r3_metrics(own, rec, valid)
    assert tuple(m) == R3_METRIC_NAMES
    assert m == {"r3/router_agreement": pytest.approx(0.8), "r3/token_any_mismatch": pytest.approx(1 / 3),
                 "r3/replayed_frac": pytest.approx(2 / 3)}
    # counts add up across micro-batches exactly
    from stability.r3 import routing_counts

    c = routing_counts(own, rec, valid)
    two = c + c
    assert two.metrics() == c.metrics() and two.recorded_decisions == 10
    # empty denominators are NaN, not a misleading number
    none = RoutingCounts().metrics()
    assert all(math.isnan(v) for v in none.values())
    assert math.isnan(router_agreement(own, torch.full_like(rec, -1), valid))
    assert replayed_frac(torch.full_like(rec, -1), valid) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        router_agreement(own[:, :2], rec, valid)
