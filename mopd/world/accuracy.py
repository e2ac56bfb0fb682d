"""Greedy exact-match accuracy with plain transformers, for building and calibrating the world.

The product evaluates with vLLM; this path exists so the world can be built and checked without an
engine. Rows are batched by prompt length, so no padding is ever needed and positions match training.
Rows that name an environment (`env`) are rolled out turn by turn against it (`multi_turn_generate`): the
model writes until EOS or one of the environment's stop strings, the environment answers through
rollout.envs.run_step, its observation is appended, and the model goes on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from mopd.world.tokenizer import encode_prompt
from rewards.verifiers import verify
from rollout.envs import ENV, STUDENT, make_env, run_step


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


def _first_stop(tok: PreTrainedTokenizerFast, ids: list[int], stops: Sequence[str]) -> tuple[list[int], str]:
    """`ids` cut after the first EOS or the first token whose text completes a stop string, and why it ended
    (`eos`, `stop`, or `length` when neither came)."""
    for k, t in enumerate(ids):
        if t == tok.eos_token_id:
            return ids[: k + 1], "eos"
        if stops and any(tok.decode(ids[: k + 1], skip_special_tokens=False).endswith(s) for s in stops):
            return ids[: k + 1], "stop"
    return ids, "length"


@torch.no_grad()
def multi_turn_generate(model: PreTrainedModel, tok: PreTrainedTokenizerFast, rows: Sequence[dict[str, Any]],
                        max_new_tokens: int, max_turns: int = 8, timeout_s: float = 10.0,
                        batch_size: int = 256) -> list[list[tuple[str, str]]]:
    """Greedy multi-turn trajectories, one per row, as (author, text) pieces after the prompt.

    Each row's environment (`row["env"]`, a fresh one per trajectory) answers every turn that ends in one of its
    stop strings; a turn that ends in EOS, an environment that says done or fails (`run_step`'s outcomes), the
    turn limit or `max_new_tokens` in all (student and observation tokens together) end the trajectory. Turns
    of all live trajectories are generated together, grouped by length so no padding is needed.
    """
    model.eval()
    envs = [make_env(r["env"]) for r in rows]
    pieces: list[list[tuple[str, str]]] = [[] for _ in rows]
    ids = [encode_prompt(tok, r["prompt"]) for r in rows]
    start = [len(x) for x in ids]
    live = list(range(len(rows)))
    for turn in range(max_turns):
        budget = {i: max_new_tokens - (len(ids[i]) - start[i]) for i in live}
        live = [i for i in live if budget[i] > 0]
        if not live:
            break
        by_len: dict[int, list[int]] = defaultdict(list)
        for i in live:
            by_len[len(ids[i])].append(i)
        ended: dict[int, str] = {}
        for length, idx in sorted(by_len.items()):
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                x = torch.tensor([ids[i] for i in chunk], dtype=torch.long)
                gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                     max_new_tokens=max(budget[i] for i in chunk), do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                for i, new in zip(chunk, gen[:, length:].tolist(), strict=True):
                    written, why = _first_stop(tok, new[: budget[i]], envs[i].stop)
                    ids[i] += written
                    pieces[i].append((STUDENT, tok.decode(written, skip_special_tokens=False)))
                    ended[i] = why
        nxt = []
        for i in live:
            if ended[i] != "stop" or turn == max_turns - 1:  # no observation the student would never read
                continue
            step = run_step(envs[i], rows[i], pieces[i][:-1], pieces[i][-1][1], timeout_s=timeout_s)
            if step.done:
                continue
            obs = step.observation
            obs_ids = tok.encode(obs, add_special_tokens=False) if isinstance(obs, str) else list(obs)
            ids[i] += obs_ids
            pieces[i].append((ENV, obs if isinstance(obs, str) else tok.decode(obs_ids)))
            nxt.append(i)
        live = nxt
    return pieces


def reference_length(row: dict[str, Any]) -> int:
    """Characters of the reference response: the tool trajectory, the worked solution or the answer."""
    if "turns" in row:
        return sum(len(text) for _, text in row["turns"])
    return len(row.get("solution", row["answer"]))


def accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerFast, rows: Sequence[dict[str, Any]],
             max_new_tokens: int | None = None) -> dict[str, float]:
    """Exact-match accuracy per domain (verifier score averaged over that domain's rows); generation may run
    two tokens past the longest reference response (a worked `solution` or a tool trajectory where the row has
    one). Rows with an `env` are rolled out against it and scored on the whole response (turns and
    observations), as the rollout scores them."""
    if max_new_tokens is None:
        max_new_tokens = max(reference_length(r) for r in rows) + 2
    single = [k for k, r in enumerate(rows) if not r.get("env")]
    multi = [k for k, r in enumerate(rows) if r.get("env")]
    texts: list[str] = [""] * len(rows)
    for k, t in zip(single, greedy_generate(model, tok, [rows[k]["prompt"] for k in single], max_new_tokens),
                    strict=True):
        texts[k] = t
    if multi:
        for k, traj in zip(multi, multi_turn_generate(model, tok, [rows[k] for k in multi], max_new_tokens),
                           strict=True):
            texts[k] = "".join(text for _, text in traj)
    hits: dict[str, list[float]] = defaultdict(list)
    for r, t in zip(rows, texts, strict=True):
        hits[r["domain"]].append(verify(r["domain"], t, r["answer"]))
    return {d: sum(v) / len(v) for d, v in sorted(hits.items())}
