"""Greedy exact-match accuracy with plain transformers, for building and calibrating the world.

The product evaluates with vLLM; this path exists so the world can be built and checked without an
engine. Rows are batched by prompt length, so no padding is ever needed and positions match training.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from mopd.world.tokenizer import encode_prompt
from rewards.verifiers import verify


@torch.no_grad()
def greedy_generate(model: PreTrainedModel, tok: PreTrainedTokenizerFast, prompts: Sequence[str],
                    max_new_tokens: int = 12, batch_size: int = 256) -> list[str]:
    """Greedy completions (text up to and including `<eos>` if produced) for each prompt."""
    model.eval()
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = [encode_prompt(tok, p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out: list[str] = [""] * len(prompts)
    for length in sorted(by_len):
        idx = by_len[length]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
            for i, row in zip(chunk, gen[:, length:].tolist(), strict=True):
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id) + 1]
                out[i] = tok.decode(row, skip_special_tokens=False)
    return out


def accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerFast, rows: Sequence[dict[str, Any]],
             max_new_tokens: int | None = None) -> dict[str, float]:
    """Exact-match accuracy per domain (verifier score averaged over that domain's rows); generation may run
    two tokens past the longest reference response (a worked `solution` where the row has one)."""
    if max_new_tokens is None:
        max_new_tokens = max(len(r.get("solution", r["answer"])) for r in rows) + 2
    texts = greedy_generate(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    hits: dict[str, list[float]] = defaultdict(list)
    for r, t in zip(rows, texts, strict=True):
        hits[r["domain"]].append(verify(r["domain"], t, r["answer"]))
    return {d: sum(v) / len(v) for d, v in sorted(hits.items())}
