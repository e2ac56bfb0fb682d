"""A teacher as a `vllm.LLM` that scores the student's own tokens by prefill (prompt log-probs).

Temperature is fixed at 1: the teacher's distribution, not a sharpened one, is the reward. The first
prompt position has no log-prob, which is harmless because only response positions are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rollout.vllm_engine import VllmEngine


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


class TeacherEngine(VllmEngine):
    """Scores sequences; can also generate (teacher samples for the off-policy SFT baseline)."""

    def __init__(self, model_path: str, *, max_top_k: int = 0, **kw) -> None:
        # Full-vocabulary scoring (top_k = -1) needs max_logprobs >= vocab.
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
        super().__init__(model_path, max_logprobs=vocab_size if max_top_k < 0 else max(1, max_top_k), **kw)

    def score(self, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> list[TeacherScores]:
        for i, s in enumerate(sequences):
            if len(s) + 1 > self.max_model_len:
                raise ValueError(f"sequence {i} has {len(s)} tokens, over the teacher's max_model_len="
                                 f"{self.max_model_len}; raise rollout.max_tokens/data.max_prompt_tokens consistently")
        if top_k > 0 and top_k > self.max_logprobs:
            raise ValueError(f"top_k={top_k} exceeds this teacher's max_logprobs={self.max_logprobs}")
        return prompt_logprobs_of(self.llm, sequences, prompt_lens, top_k=top_k)
