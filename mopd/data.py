"""Prompt records and the per-domain batch sampler.

Batch `s` is a pure function of (seed, s), so a resumed run draws exactly the batches the
interrupted one would have, with no sampler state to save beyond the step number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    pass


def load_rows(files: list[str]) -> list[dict]:
    """Rows from JSONL or Parquet files; each needs `prompt` (str or chat messages) and `domain`."""
    rows: list[dict] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise DataError(f"data file not found: {p} (set data.train_files / data.eval_files; the quickstart "
                            "world is built by `mopd world build`)")
        if p.suffix == ".parquet":
            import pandas as pd

            recs = pd.read_parquet(p).to_dict(orient="records")
        else:
            recs = []
            with p.open() as fh:
                for ln, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{ln}: not valid JSON ({e.msg})") from None
        for i, r in enumerate(recs):
            where = f"{p} row {i + 1}"
            if not isinstance(r.get("prompt"), str | list):
                raise DataError(f"{where}: needs a 'prompt' (string or list of chat messages); got keys {sorted(r)}")
            if not isinstance(r.get("domain"), str):
                raise DataError(f"{where}: needs a 'domain' string naming the teacher's domain; got {r.get('domain')!r}")
            r.setdefault("id", f"{p.stem}-{i}")
        rows.extend(recs)
    if not rows:
        raise DataError(f"no rows in {files}")
    return rows


def encode_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("a chat-message prompt needs a tokenizer with a chat template; give plain-text prompts "
                        "or use a student whose tokenizer has one")
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))


def encode_rows(tokenizer: Any, rows: list[dict], max_prompt_tokens: int) -> list[list[int]]:
    out = []
    for r in rows:
        ids = encode_prompt(tokenizer, r["prompt"])
        if len(ids) > max_prompt_tokens:
            raise DataError(f"prompt of row '{r['id']}' has {len(ids)} tokens, over data.max_prompt_tokens="
                            f"{max_prompt_tokens}; shorten it or raise data.max_prompt_tokens")
        if not ids:
            raise DataError(f"prompt of row '{r['id']}' is empty after tokenization")
        out.append(ids)
    return out


class DomainMixSampler:
    def __init__(self, rows: list[dict], mix: dict[str, float] | None, seed: int) -> None:
        self.by_domain: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            self.by_domain.setdefault(r["domain"], []).append(i)
        self.domains = sorted(self.by_domain)
        if mix:
            unknown = sorted(set(mix) - set(self.domains))
            if unknown:
                raise DataError(f"data.domain_mix names domains with no rows: {unknown}; present: {self.domains}")
            w = np.array([float(mix.get(d, 0.0)) for d in self.domains])
        else:
            w = np.array([len(self.by_domain[d]) for d in self.domains], dtype=float)
        if w.sum() <= 0:
            raise DataError("data.domain_mix gives every domain weight 0")
        self.weights = w / w.sum()
        self.seed = seed

    def batch(self, step: int, size: int) -> list[int]:
        """Row indices for step `step`: domains drawn by the mix, rows uniformly within a domain."""
        rng = np.random.default_rng([self.seed, step])
        counts = rng.multinomial(size, self.weights)
        idx: list[int] = []
        for d, c in zip(self.domains, counts, strict=True):
            pool = self.by_domain[d]
            idx.extend(int(pool[j]) for j in rng.choice(len(pool), size=int(c), replace=len(pool) < c))
        return idx
