"""Scoring given tokens by prefill: the log-prob a vLLM engine assigns to each response token of a
sequence it did not sample (`prompt_logprobs`, temperature 1, one generated token).

Teachers score the student's samples this way, and the student engine uses the same call to check that
synced weights give the trainer's log-probs. The first prompt position has no log-prob, which is
harmless because only response positions are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class TokenScores:
    # log pi(y_t) of the scoring model for every response token.
    logprobs: list[float]
    # Optional top-k per response position, rank order, as [response tokens, K] arrays (int64 ids, float32
    # log-probs; a position with fewer than K is padded with id -1 and log-prob -inf); None when top_k == 0.
    # Arrays, not lists of lists: a whole-vocabulary answer is response tokens x vocabulary numbers, which as
    # Python objects cost more to build, send and turn into the trainer's tensors than the scoring itself.
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


def pack_topk(ids: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-position top-k lists (possibly ragged) as `TokenScores`' padded arrays."""
    K = max((len(k) for k in ids), default=0)
    ids_RK = np.full((len(ids), K), -1, dtype=np.int64)
    lps_RK = np.full((len(ids), K), -np.inf, dtype=np.float32)
    for j, (ki, kl) in enumerate(zip(ids, logprobs, strict=True)):
        ids_RK[j, :len(ki)] = ki
        lps_RK[j, :len(kl)] = kl
    return ids_RK, lps_RK


def prompt_logprobs_of(llm, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> list[TokenScores]:
    """Score response tokens (positions >= prompt_len) of each sequence with one prefill each."""
    from vllm import SamplingParams  # vLLM reads its environment at import: after apply_vllm_env

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=top_k, detokenize=False,
                            flat_logprobs=True)
    outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    return [_read_flat(out.prompt_logprobs, seq, plen, top_k)
            for seq, plen, out in zip(sequences, prompt_lens, outs, strict=True)]


def _read_flat(flat, seq: list[int], plen: int, top_k: int) -> TokenScores:
    """One sequence's scores from vLLM's flat prompt log-probs. vLLM lists at each position the scored token
    first, then the top-k in rank order (the token may appear in both): read as whole arrays when every
    position has that shape, entry by entry otherwise."""
    n = len(seq)
    if n > plen:
        starts = np.asarray(flat.start_indices[plen:n], dtype=np.int64)
        ends = np.asarray(flat.end_indices[plen:n], dtype=np.int64)
        lo, hi = int(starts[0]), int(ends[-1])
        tid = np.asarray(flat.token_ids[lo:hi], dtype=np.int64)
        lp = np.asarray(flat.logprobs[lo:hi], dtype=np.float64)
        first, K = starts - lo, int(ends[0] - starts[0] - 1)
        idx_RK = first[:, None] + 1 + np.arange(K)
        regular = bool((tid[first] == np.asarray(seq[plen:n])).all() and (ends - starts - 1 == K).all())
        if regular and top_k != 0:
            ranks = np.asarray(flat.ranks[lo:hi], dtype=np.float64)  # a rank of None reads as NaN: irregular
            regular = (top_k < 0 or K <= top_k) and bool((ranks[idx_RK] == np.arange(1, K + 1)).all())
        if regular:
            if top_k == 0:
                return TokenScores(lp[first].tolist())
            return TokenScores(lp[first].tolist(), tid[idx_RK], lp[idx_RK].astype(np.float32))
    return _read_flat_entries(flat, seq, plen, top_k)


def _read_flat_entries(flat, seq: list[int], plen: int, top_k: int) -> TokenScores:
    lps, ids_k, lps_k = [], [], []
    for pos in range(plen, len(seq)):
        start, end = flat.start_indices[pos], flat.end_indices[pos]
        tok = seq[pos]
        lp = None
        top: dict[int, tuple[int, float]] = {}
        for j in range(start, end):
            tid, rank = flat.token_ids[j], flat.ranks[j]
            if tid == tok and lp is None:
                lp = float(flat.logprobs[j])
            if top_k != 0 and rank is not None and (top_k < 0 or rank <= top_k):
                top[tid] = (rank, float(flat.logprobs[j]))
        if lp is None:
            raise RuntimeError(f"vLLM returned no prompt log-prob for token {tok} at position {pos}")
        lps.append(lp)
        if top_k != 0:
            ranked = sorted(top.items(), key=lambda kv: kv[1][0])
            ids_k.append([t for t, _ in ranked])
            lps_k.append([v for _, (_, v) in ranked])
    return TokenScores(lps, *pack_topk(ids_k, lps_k)) if top_k != 0 else TokenScores(lps)
