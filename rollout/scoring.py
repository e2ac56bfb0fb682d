"""Scoring given tokens by prefill: the log-prob a vLLM engine assigns to each response token of a
sequence it did not sample (`prompt_logprobs`, temperature 1, one generated token).

Teachers score the student's samples this way, and the student engine uses the same call to check that
synced weights give the trainer's log-probs. The first prompt position has no log-prob, which is
harmless because only response positions are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenScores:
    # log pi(y_t) of the scoring model for every response token.
    logprobs: list[float]
    # Optional top-k per response position, rank order; empty when top_k == 0.
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)


def prompt_logprobs_of(llm, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> list[TokenScores]:
    """Score response tokens (positions >= prompt_len) of each sequence with one prefill each."""
    from vllm import SamplingParams  # vLLM reads its environment at import: after apply_vllm_env

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=top_k, detokenize=False,
                            flat_logprobs=True)
    outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    result = []
    for seq, plen, out in zip(sequences, prompt_lens, outs, strict=True):
        flat = out.prompt_logprobs
        lps, ids_k, lps_k = [], [], []
        for pos in range(plen, len(seq)):
            start, end = flat.start_indices[pos], flat.end_indices[pos]
            tok = seq[pos]
            lp = None
            # vLLM lists the scored token first, then the top-k (the token may appear in both).
            top: dict[int, tuple[int, float]] = {}
            for j in range(start, end):
                tid, rank = flat.token_ids[j], flat.ranks[j]
                if tid == tok:
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
        result.append(TokenScores(lps, ids_k, lps_k))
    return result
