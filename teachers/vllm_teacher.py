"""A teacher as a `vllm.LLM` that scores the student's own tokens by prefill (prompt log-probs).

Temperature is fixed at 1: the teacher's distribution, not a sharpened one, is the reward. The first
prompt position has no log-prob, which is harmless because only response positions are read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rollout.vllm_engine import make_llm


@dataclass
class TeacherScores:
    # log pi_teacher(y_t) for every response token.
    logprobs: list[float]
    # Optional top-k per response position, rank order; empty when top_k == 0.
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)


def prompt_logprobs_of(llm, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> list[TeacherScores]:
    """Score response tokens (positions >= prompt_len) of each sequence with one prefill each."""
    from vllm import SamplingParams

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
        result.append(TeacherScores(lps, ids_k, lps_k))
    return result


class TeacherEngine:
    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 128, seed: int = 0,
                 max_top_k: int = 0, enforce_eager: bool = True,
                 gpu_memory_utilization: float = 0.3, omp_threads: int = 1, kv_cache_gb: int = 1) -> None:
        t0 = time.perf_counter()
        self.model_path = model_path
        self.max_model_len = max_model_len
        # Full-vocabulary scoring (top_k = -1) needs max_logprobs >= vocab.
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
        max_logprobs = vocab_size if max_top_k < 0 else max(1, max_top_k)
        self.max_logprobs = max_logprobs
        self.llm = make_llm(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                            max_logprobs=max_logprobs, enforce_eager=enforce_eager,
                            gpu_memory_utilization=gpu_memory_utilization, omp_threads=omp_threads,
                            kv_cache_gb=kv_cache_gb)
        self.startup_s = time.perf_counter() - t0

    def ready(self) -> dict:
        return {"startup_s": self.startup_s, "max_logprobs": self.max_logprobs}

    def score(self, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> list[TeacherScores]:
        for i, s in enumerate(sequences):
            if len(s) + 1 > self.max_model_len:
                raise ValueError(f"sequence {i} has {len(s)} tokens, over the teacher's max_model_len="
                                 f"{self.max_model_len}; raise rollout.max_tokens/data.max_prompt_tokens consistently")
        if top_k > 0 and top_k > self.max_logprobs:
            raise ValueError(f"top_k={top_k} exceeds this teacher's max_logprobs={self.max_logprobs}")
        return prompt_logprobs_of(self.llm, sequences, prompt_lens, top_k=top_k)
