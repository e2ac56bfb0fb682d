"""Reading vLLM's flat prompt log-probs into `TokenScores`' arrays: the whole-array read and the entry-by-entry
one agree, whatever shape vLLM gives each position."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rollout.scoring import _read_flat, _read_flat_entries, pack_topk
from rollout.vllm_env import apply_vllm_env

apply_vllm_env(1)
from vllm.logprobs import FlatLogprobs  # noqa: E402  (vLLM reads its environment at import)

V = 11


def flat_of(seq: list[int], top_k: int, seed: int = 0, short_at: int | None = None) -> FlatLogprobs:
    """What vLLM returns for one scored sequence: per position the scored token (with its rank), then the top-k
    in rank order (the scored token again when it is among them); position 0 has none."""
    rng = random.Random(seed)
    flat = FlatLogprobs()
    flat.append(None)
    for pos in range(1, len(seq)):
        lps = sorted((math.log(rng.random()) for _ in range(V)), reverse=True)
        order = rng.sample(range(V), V)  # order[r] holds rank r + 1
        rank = {t: r + 1 for r, t in enumerate(order)}
        k = V if top_k < 0 else top_k
        if pos == short_at:
            k -= 1
        ids = [seq[pos]] + order[:k]
        flat.append_fast(ids, [lps[rank[t] - 1] for t in ids], iter([rank[t] for t in ids]), [None] * len(ids))
    return flat


@pytest.mark.parametrize("top_k", [0, 1, 4, -1])
@pytest.mark.parametrize("short_at", [None, 5])
def test_whole_array_read_equals_entry_by_entry(top_k, short_at):
    seq, plen = [3, 1, 4, 1, 5, 9, 2, 6], 3
    for seed in range(5):
        flat = flat_of(seq, top_k, seed, short_at if top_k > 1 else None)
        got, want = _read_flat(flat, seq, plen, top_k), _read_flat_entries(flat, seq, plen, top_k)
        assert got.logprobs == want.logprobs and len(got.logprobs) == len(seq) - plen
        if top_k == 0:
            assert got.topk_ids is None and want.topk_ids is None
            continue
        assert np.array_equal(got.topk_ids, want.topk_ids) and np.array_equal(got.topk_logprobs, want.topk_logprobs)
        K = V if top_k < 0 else top_k
        assert got.topk_ids.shape == (len(seq) - plen, K) and got.topk_logprobs.dtype == np.float32
        for j, pos in enumerate(range(plen, len(seq))):  # rank order, and the scored token's own log-prob
            row = got.topk_logprobs[j][got.topk_ids[j] >= 0]
            assert (np.diff(row) <= 0).all()
            if seq[pos] in got.topk_ids[j]:
                assert got.topk_logprobs[j][list(got.topk_ids[j]).index(seq[pos])] == np.float32(got.logprobs[j])
        if short_at is not None and top_k > 1:  # the short position is padded
            assert got.topk_ids[short_at - plen, -1] == -1 and got.topk_logprobs[short_at - plen, -1] == -np.inf


def test_pack_topk_pads_ragged_rows():
    ids, lps = pack_topk([[4, 2], [7], []], [[-0.5, -1.5], [-0.25], []])
    assert ids.tolist() == [[4, 2], [7, -1], [-1, -1]] and ids.dtype == np.int64
    assert lps.tolist() == [[-0.5, -1.5], [-0.25, -np.inf], [-np.inf, -np.inf]] and lps.dtype == np.float32
    assert pack_topk([], [])[0].shape == (0, 0)
