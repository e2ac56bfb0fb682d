"""A small supervised fine-tuning loop with answer-only loss.

Used to build the quickstart world (teachers, student warm-start) and later as the off-policy
baseline ("SFT on teacher samples"), so it takes plain rows with `prompt` and `answer` strings and knows
nothing about domains. Loss covers only the answer tokens and the closing `<eos>`: the model must learn
to answer and to stop, not to predict prompts it will always be given. Determinism comes from seeds and
step counts only (no wall-clock): same inputs and thread count give the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from mopd.world.tokenizer import encode_answer, encode_prompt
from rollout.envs import ENV

IGNORE = -100


# One example: token ids, prompt length, and optionally the positions written by an environment (no loss).
Example = tuple[list[int], int] | tuple[list[int], int, list[int]]


def encode_sft_examples(tok: PreTrainedTokenizerFast, rows: Sequence[dict[str, Any]]) -> list[Example]:
    """(prompt + answer + eos ids, prompt length) per row, with the same encoding inference uses. A row with
    `turns` (a tool-using trajectory of (author, text) pieces) is encoded piece by piece, as the rollout appends
    them, and also returns the positions of its observations (author `env`): the environment wrote them, so the
    model is not trained to predict them, only to read them."""
    out: list[Example] = []
    for r in rows:
        p = encode_prompt(tok, r["prompt"])
        if "turns" not in r:
            out.append((p + encode_answer(tok, r["answer"]), len(p)))
            continue
        ids, observed = list(p), []
        for author, text in r["turns"]:
            piece = tok.encode(text, add_special_tokens=False)
            if author == ENV:
                observed += range(len(ids), len(ids) + len(piece))
            ids += piece
        out.append((ids + [tok.eos_token_id], len(p), observed))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt, observations and padding, so only the tokens the model
    itself writes (answer, tool calls, eos) are scored."""
    width = max(len(ex[0]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, plen, *observed) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        labels[i, plen : len(ids)] = t[plen:]
        if observed and observed[0]:
            labels[i, observed[0]] = IGNORE
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _batches(n: int, batch_size: int, gen: torch.Generator,
             weights: Sequence[float] | None = None) -> Iterator[list[int]]:
    if weights is not None:
        # Weighted mixtures (e.g. per-domain shares) draw rows with replacement in proportion to weight.
        w = torch.tensor(weights, dtype=torch.float64)
        while True:
            yield torch.multinomial(w, batch_size, replacement=True, generator=gen).tolist()
    # Otherwise epoch-wise shuffles: every row is seen once per epoch, in a seeded order.
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n - batch_size + 1, batch_size):  # the remainder waits for the next epoch
            yield perm[i : i + batch_size]


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup, then constant / linear / cosine decay to 10% of the peak."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    frac = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - 0.9 * frac
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}; known: constant, linear, cosine")


def sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, Any]],
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, PreTrainedModel], None] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Train `model` in place for `steps` AdamW steps on `rows` (`prompt`/`answer` strings).

    Returns `{"loss": [per-step loss], "final_loss": mean of the last 10% of steps, "tokens": n}` where
    `tokens` counts the supervised (answer + eos) tokens seen. `on_step(step, model)` runs after every
    optimizer step (1-based), e.g. to evaluate on a schedule; the model is back in train mode after it.
    `weights` (one per row) switches from shuffled epochs to weighted sampling with replacement.
    """
    if not rows:
        raise ValueError("sft needs at least one row with 'prompt' and 'answer'")
    if weights is not None and len(weights) != len(rows):
        raise ValueError(f"sft: {len(weights)} weights for {len(rows)} rows")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = encode_sft_examples(tokenizer, rows)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup_steps, schedule))
    model.train()
    losses: list[float] = []
    tokens = 0
    batches = _batches(len(data), min(batch_size, len(data)), gen, weights)
    for step in range(steps):
        batch = collate([data[i] for i in next(batches)], tokenizer.pad_token_id)
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        tokens += int((batch["labels"] != IGNORE).sum())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(f"  sft step {step + 1}/{steps} loss {losses[-1]:.4f} lr {sched.get_last_lr()[0]:.2e}")
        if on_step is not None:
            on_step(step + 1, model)
            model.train()
    model.eval()
    tail = losses[-max(1, steps // 10):] if losses else [float("nan")]
    return {"loss": losses, "final_loss": sum(tail) / len(tail), "tokens": tokens}
