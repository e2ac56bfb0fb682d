"""mopd/chunked_logits.py: chunked == unchunked (values and gradients), == the existing [B, T, V] reference
path, hidden states of a real tiny Qwen3-MoE, and the memory property (no [N, V] tensor in the chunked
path's graph or anywhere in its forward/backward)."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mopd.chunked_logits import TokenStats, hidden_and_head, token_stats
from mopd.losses import reverse_kl_per_token, token_entropy

N, H, V = 37, 16, 101


def _problem(seed: int = 0, n: int = N, h: int = H, v: int = V, k: int | None = 7, pad: bool = True):
    """Random head, hidden states, targets and a teacher top-k (k = None: full vocabulary, K = V)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.5)
    hidden = (torch.randn(n, h, generator=g) * 1.5).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    teacher = torch.log_softmax(torch.randn(n, v, generator=g) * 2.0, dim=-1)
    if k is None:
        return head, hidden, targets, torch.arange(v).expand(n, v).clone(), teacher
    top = teacher.topk(k, dim=-1)
    ids, logps = top.indices.clone(), top.values.clone()
    if pad:  # variable k: padding slots (-1) at the end of some rows, and one row with no slot at all
        ids[::3, -2:] = -1
        ids[5, :] = -1
    return head, hidden, targets, ids, logps


def _grads(head, hidden, stats: TokenStats, seed: int = 1):
    """Gradients of a random per-position combination of all three differentiable outputs."""
    g = torch.Generator().manual_seed(seed)
    n = hidden.shape[0]
    a, b, c = (torch.randn(n, generator=g) for _ in range(3))
    loss = (a * stats.logprobs_N).sum() + (b * stats.entropy_N).sum()
    if stats.kl_N is not None:
        loss = loss + (c * stats.kl_N).sum()
    head.zero_grad(set_to_none=True)
    hidden.grad = None
    loss.backward()
    return hidden.grad.clone(), head.weight.grad.clone()


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


@pytest.mark.parametrize("k", [7, None], ids=["topk_padded", "full_vocab"])
@pytest.mark.parametrize("topk_mode", ["tail", "renorm"])
@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 37, 64])
def test_chunked_equals_unchunked(chunk, topk_mode, k):
    head, hidden, targets, ids, logps = _problem(k=k)
    ref = token_stats(hidden, head, targets, ids, logps, chunk_tokens=0, topk_mode=topk_mode)
    ref_gh, ref_gw = _grads(head, hidden, ref)
    got = token_stats(hidden, head, targets, ids, logps, chunk_tokens=chunk, topk_mode=topk_mode)
    got_gh, got_gw = _grads(head, hidden, got)
    for name in ("logprobs_N", "entropy_N", "kl_N", "student_mass_N", "teacher_mass_N"):
        _close(getattr(got, name), getattr(ref, name))
    _close(got_gh, ref_gh)
    _close(got_gw, ref_gw)
    assert got.kl_N.requires_grad and got.entropy_N.requires_grad and got.logprobs_N.requires_grad
    assert not got.student_mass_N.requires_grad and not got.teacher_mass_N.requires_grad


@pytest.mark.parametrize("chunk", [0, 4])
def test_without_teacher(chunk):
    head, hidden, targets, _, _ = _problem()
    ref = token_stats(hidden, head, targets, chunk_tokens=0)
    got = token_stats(hidden, head, targets, chunk_tokens=chunk)
    assert got.kl_N is None and got.student_mass_N is None and got.teacher_mass_N is None
    _close(got.logprobs_N, ref.logprobs_N)
    _close(got.entropy_N, ref.entropy_N)
    ref_g = _grads(head, hidden, ref)
    got_g = _grads(head, hidden, got)
    _close(got_g[0], ref_g[0])
    _close(got_g[1], ref_g[1])


@pytest.mark.parametrize("topk_mode", ["tail", "renorm"])
def test_unchunked_equals_reference_path(topk_mode):
    """The path the trainer uses today: full logits -> log_softmax -> gather; losses' KL on [1, N, V]."""
    head, hidden, targets, ids, logps = _problem()
    got = token_stats(hidden, head, targets, ids, logps, topk_mode=topk_mode)

    logits_1NV = head(hidden).unsqueeze(0)
    logp_1NV = logits_1NV.float().log_softmax(-1)
    lp_N = logp_1NV.gather(-1, targets[None, :, None]).squeeze(-1).squeeze(0)
    kl_1N, s_1N, t_1N = reverse_kl_per_token(logp_1NV, ids[None], logps[None], topk_mode=topk_mode)
    mask_1N = torch.ones(1, N)
    _close(got.logprobs_N, lp_N)
    _close(got.kl_N, kl_1N[0])
    _close(got.student_mass_N, s_1N[0])
    _close(got.teacher_mass_N, t_1N[0])
    _close(got.entropy_N.mean(), token_entropy(logits_1NV, mask_1N))
    # and the entropy per position, written out
    _close(got.entropy_N, -(logp_1NV.exp() * logp_1NV).sum(-1)[0])
    assert float(got.kl_N[5].detach()) == 0.0  # the row with no top-k slot

    ref_loss = (lp_N.sum() + kl_1N.sum() + token_entropy(logits_1NV, mask_1N) * N)
    gh_ref, = torch.autograd.grad(ref_loss, hidden)
    got_loss = got.logprobs_N.sum() + got.kl_N.sum() + got.entropy_N.sum()
    gh, = torch.autograd.grad(got_loss, hidden)
    _close(gh, gh_ref)


def test_full_vocab_kl_is_exact_reverse_kl():
    head, hidden, targets, ids, logps = _problem(k=None)
    got = token_stats(hidden, head, targets, ids, logps, chunk_tokens=10)
    ls = torch.log_softmax(head(hidden).double(), -1)
    _close(got.kl_N.double(), (ls.exp() * (ls - logps.double())).sum(-1))


def test_no_grad_and_empty_and_dtype():
    head, hidden, targets, ids, logps = _problem()
    with torch.no_grad():
        a = token_stats(hidden, head, targets, ids, logps, chunk_tokens=6)
    b = token_stats(hidden, head, targets, ids, logps)
    _close(a.kl_N, b.kl_N)
    assert not a.kl_N.requires_grad
    e = token_stats(hidden[:0], head, targets[:0], ids[:0], logps[:0], chunk_tokens=4)
    assert e.logprobs_N.shape == e.kl_N.shape == (0,)
    # a bf16 head still gives fp32 statistics (logits are upcast before log_softmax)
    s = token_stats(hidden.bfloat16(), head.bfloat16(), targets, ids, logps, chunk_tokens=8)
    assert s.logprobs_N.dtype == s.entropy_N.dtype == s.kl_N.dtype == torch.float32
    with pytest.raises(ValueError):
        token_stats(hidden, head, targets, chunk_tokens=-1)
    with pytest.raises(ValueError):
        token_stats(hidden, head, targets, ids, None)


def test_head_runs_once_per_chunk_forward_and_once_more_in_backward():
    """Checkpointing really recomputes: the head is called per chunk in the forward and again in backward."""
    head, hidden, targets, ids, logps = _problem()
    calls: list[int] = []
    head.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    s = token_stats(hidden, head, targets, ids, logps, chunk_tokens=10)
    assert calls == [10, 10, 10, 7]
    (s.logprobs_N.sum() + s.kl_N.sum()).backward()
    assert sorted(calls[4:]) == [7, 10, 10, 10]


# ---------------------------------------------------------------------------------------------------------
# memory


def _saved_numels(hidden, head, targets, ids, logps, chunk):
    numels: list[int] = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = token_stats(hidden, head, targets, ids, logps, chunk_tokens=chunk)
        loss = s.logprobs_N.sum() + s.entropy_N.sum() + s.kl_N.sum()
    loss.backward()
    return numels


def test_chunked_graph_never_saves_a_tokens_by_vocab_tensor():
    n, v = 512, 32000
    head, hidden, targets, ids, logps = _problem(n=n, v=v, k=16)
    full = _saved_numels(hidden, head, targets, ids, logps, 0)
    chunked = _saved_numels(hidden, head, targets, ids, logps, 64)
    assert max(full) >= n * v  # the reference keeps [N, V] tensors from forward to backward
    assert chunked and max(chunked) < 64 * v  # the chunked graph keeps nothing vocabulary-sized


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ops inside the mode (forward and backward).

    Deterministic (sizes, not timing): every op's outputs are tracked by a weak reference to their storage
    and counted until it is freed, wherever the storage is held (graph, checkpoint frame, locals).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                self.live.setdefault(ref.cdata, (ref, st.nbytes()))
                self.largest = max(self.largest, t.numel())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_chunked_peak_live_memory_scales_with_chunk_not_tokens():
    n, v, c = 256, 8000, 32
    head, hidden, targets, ids, logps = _problem(n=n, v=v, k=16)
    peaks, largest = {}, {}
    for chunk in (0, c):
        with _LiveBytes() as mode:
            s = token_stats(hidden, head, targets, ids, logps, chunk_tokens=chunk)
            (s.logprobs_N.sum() + s.entropy_N.sum() + s.kl_N.sum()).backward()
        peaks[chunk], largest[chunk] = mode.peak, mode.largest
        hidden.grad = None
        head.zero_grad(set_to_none=True)
    nv_bytes = n * v * 4
    assert largest[0] >= n * v and largest[c] <= c * (v + 1)  # no op ever makes an [N, V] tensor
    assert peaks[0] >= 2 * nv_bytes  # the reference holds several [N, V] fp32 tensors at once
    # one chunk's working set (several [C, V] tensors) plus the weight's gradient; N / C = 8 here
    assert peaks[c] <= peaks[0] / 4, (peaks[c] / nv_bytes, peaks[0] / nv_bytes)


# ---------------------------------------------------------------------------------------------------------
# hidden states of a real transformers model


def _tiny(moe: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, intermediate_size=48, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    torch.manual_seed(0)
    if moe:
        cfg = Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        return Qwen3MoeForCausalLM(cfg).float().eval()
    return Qwen3ForCausalLM(Qwen3Config(**common)).float().eval()


@pytest.mark.parametrize("moe", [True, False], ids=["qwen3_moe", "qwen3"])
def test_hidden_and_head_matches_model_logits(moe):
    model = _tiny(moe)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 101, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        hidden, head = hidden_and_head(model, ids, mask)
        got = head(hidden)
    assert head is model.get_output_embeddings()
    assert hidden.shape == (2, 9, 32)
    _close(got, ref)

    # end to end: token_stats on the response positions == log_softmax of the model's logits there
    valid = mask[:, 1:].bool()
    hidden, head = hidden_and_head(model, ids, mask)
    s = token_stats(hidden[:, :-1][valid], head, ids[:, 1:][valid], chunk_tokens=4)
    want = ref[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)[valid]
    _close(s.logprobs_N, want)


def test_hidden_and_head_refuses_transformed_logits():
    model = _tiny(moe=False)
    model.config.final_logit_softcapping = 30.0
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        hidden_and_head(model, ids, torch.ones_like(ids))
