"""Prompt records and the per-domain batch sampler.

Batch `s` is a pure function of (seed, s), so a resumed run draws exactly the batches the
interrupted one would have, with no sampler state to save beyond the step number.

Every problem with the data is a `DataError` whose message names the file and line (or the row id) and
says how to fix it; training loads, validates and encodes all of it before any actor starts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rollout.envs import ENVIRONMENTS

ROW_SHAPE = '{"prompt": "...", "domain": "..."}'
CHAT_SHAPE = '[{"role": "user", "content": "..."}]'
MAX_LISTED = 5  # rows named in one error; the rest are counted


class DataError(ValueError):
    pass


def load_rows(files: list[str], dedupe: bool = False, log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows from JSONL or Parquet files; each needs `prompt` (str or chat messages) and `domain`.

    A row's `id` (a string or an integer; without one it is `<file stem>-<index>`) names it everywhere (batch
    digests, errors, samples), so ids must be unique across `files`: a repeated id is refused naming both rows,
    or with `dedupe` (`data.dedupe`) every later row of a repeated id is dropped and the drop logged.
    """
    rows: list[dict] = []
    where_of: list[str] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            raise DataError(f"data file {p} is a folder; list its JSONL or Parquet files in data.train_files / "
                            "data.eval_files")
        if not p.is_file():
            raise DataError(f"data file not found: {p} (set data.train_files / data.eval_files; the quickstart "
                            "world is built by `mopd world build`)")
        recs = _read_parquet(p) if p.suffix == ".parquet" else _read_jsonl(p)
        if not recs:
            raise DataError(f"data file {p} has no rows (it is empty); give it one {ROW_SHAPE} object per line "
                            "or remove it from data.train_files / data.eval_files")
        parquet = p.suffix == ".parquet"
        for i, r in enumerate(recs):
            where = f"{p} row {i + 1}" if parquet else f"{p} line {r[0]}"
            r = recs[i] = r if parquet else r[1]
            _check_row(r, where)
            if "id" not in r:
                r["id"] = f"{p.stem}-{i}"
            where_of.append(where)
        rows.extend(recs)
    if not rows:
        raise DataError(f"no rows in {files}")
    return _unique_ids(rows, where_of, dedupe, log)


def _unique_ids(rows: list[dict], where_of: list[str], dedupe: bool,
                log: Callable[[str], None] | None) -> list[dict]:
    first: dict[str, int] = {}
    repeats: list[tuple[int, int]] = []  # (index of the repeat, index of the first row with that id)
    for i, r in enumerate(rows):
        key = _id_key(r["id"])
        if key in first:
            repeats.append((i, first[key]))
        else:
            first[key] = i
    if not repeats:
        return rows
    listed = "; ".join(f"id {rows[i]['id']!r} at {where_of[i]} repeats {where_of[j]}" for i, j in repeats[:MAX_LISTED])
    more = f" and {len(repeats) - MAX_LISTED} more" if len(repeats) > MAX_LISTED else ""
    if not dedupe:
        raise DataError(f"{len(repeats)} row(s) repeat an earlier row's id: {listed}{more}. Row ids name rows in "
                        "batch digests and errors, so they must be unique: give each row its own id (or drop the "
                        "'id' key: rows without one are named <file stem>-<index>), or set data.dedupe=true to "
                        "drop every later row of a repeated id")
    drop = {i for i, _ in repeats}
    if log is not None:
        log(f"data.dedupe: dropped {len(drop)} row(s) whose id repeats an earlier row's: {listed}{more}")
    return [r for i, r in enumerate(rows) if i not in drop]


def _id_key(v: Any) -> str:
    return str(v)  # 7 and "7" name the same row wherever ids are printed or digested


def _read_parquet(p: Path) -> list[dict]:
    try:
        return pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        first = re.sub(r"^Could not open Parquet input source '.*?': ", "", first)[:300]
        raise DataError(f"{p}: not a readable Parquet file ({first}); write it with pyarrow / pandas "
                        "`to_parquet`, or give JSONL rows in a file not named .parquet") from None


def _read_jsonl(p: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line, decoded as strict UTF-8 line by line."""
    out = []
    with p.open("rb") as fh:
        for ln, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p} line {ln}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
            if ln == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark some editors write
            if not line.strip():
                continue
            try:
                out.append((ln, json.loads(line)))
            except json.JSONDecodeError as e:
                hint = (" (a JSON array or pretty-printed JSON is not JSONL: write one object per line)"
                        if ln == 1 and line.lstrip()[:1] in "[{" else "")
                raise DataError(f"{p} line {ln}: not valid JSON ({e.msg} at column {e.colno}){hint}; each line must be "
                                f"one object like {ROW_SHAPE}") from None
    return out


def _check_row(r: Any, where: str) -> None:
    if not isinstance(r, dict):
        raise DataError(f"{where}: each row must be a JSON object like {ROW_SHAPE}; got a "
                        f"{'JSON array' if isinstance(r, list) else type(r).__name__}")
    prompt = r.get("prompt")
    if not isinstance(prompt, str | list):
        raise DataError(f"{where}: needs a 'prompt' (a string or a list of chat messages like {CHAT_SHAPE}); "
                        f"got {'keys ' + str(sorted(r)) if prompt is None else repr(prompt)[:60]}")
    if isinstance(prompt, list):
        if not prompt:
            raise DataError(f"{where}: 'prompt' is an empty list of chat messages; give {CHAT_SHAPE} or a string")
        for j, m in enumerate(prompt, 1):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
                raise DataError(f"{where}: chat message {j} of 'prompt' is {repr(m)[:60]}; each message needs a "
                                f"'role' and a 'content', like {CHAT_SHAPE}")
    if not isinstance(r.get("domain"), str) or not r["domain"]:
        raise DataError(f"{where}: needs a 'domain' string naming the teacher's domain (teachers.<name>.domains); "
                        f"got {r.get('domain')!r}")
    if "id" in r and (isinstance(r["id"], bool) or not isinstance(r["id"], str | int) or r["id"] == ""):
        got = json.dumps(r["id"], default=str)
        raise DataError(f"{where}: 'id' is {got}; give a non-empty string or an integer, or drop the key (a row "
                        "without one is named <file stem>-<index>)")
    env = r.get("env")
    if env is not None and (not isinstance(env, str) or env not in ENVIRONMENTS):
        raise DataError(f"{where}: 'env' is {env!r}, which names no registered environment; registered: "
                        f"{sorted(ENVIRONMENTS)} (register one with rollout.envs.register_environment in code imported "
                        "before the data is loaded, or drop the row's 'env' for a single-turn row)")
    answer = r.get("answer")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise DataError(f"{where}: 'answer' is {answer} (a missing value written as NaN, e.g. by pandas); a verifier "
                        "would compare samples with the text 'nan': give the answer as a string, or drop the key "
                        "(null) for a row without one")


def encode_prompt(tokenizer: Any, prompt: str | list[dict], add_special_tokens: bool | None = None) -> list[int]:
    """Prompt ids exactly as the tokenizer intends, for training, evaluation, teacher scoring and the world
    alike: plain text with the tokenizer's own special tokens (a Llama/Gemma-style `<bos>`), chat messages
    through the chat template with the generation prompt. `add_special_tokens` (`data.add_special_tokens`)
    overrides the tokenizer's default for plain text."""
    if isinstance(prompt, str):
        special = True if add_special_tokens is None else add_special_tokens
        return list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("a chat-message prompt needs a tokenizer with a chat template; give plain-text prompts, "
                        "add a chat_template to the student's tokenizer_config.json, or use a student whose "
                        "tokenizer has one")
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_rows(tokenizer: Any, rows: list[dict], max_prompt_tokens: int,
                add_special_tokens: bool | None = None) -> list[list[int]]:
    """Every row's prompt ids. A prompt with characters the vocabulary lacks (they would silently become
    `<unk>`) is refused naming every such row and its characters; a chat prompt without a chat template, a
    prompt over `max_prompt_tokens` or an empty one is refused naming the row."""
    out = []
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown_chars: list[tuple[str, list[str]]] = []
    for r in rows:
        try:
            ids = encode_prompt(tokenizer, r["prompt"], add_special_tokens)
        except DataError as e:
            raise DataError(f"prompt of row '{r['id']}': {e}") from None
        except Exception as e:  # noqa: BLE001 - a chat template that cannot render these messages
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise DataError(f"prompt of row '{r['id']}' cannot be encoded ({type(e).__name__}: {first}); fix the "
                            "row's messages or the tokenizer's chat template") from None
        if unk is not None and unk in ids and isinstance(r["prompt"], str):
            bad = sorted({ch for ch in r["prompt"] if tokenizer(ch, add_special_tokens=False)["input_ids"] == [unk]})
            unknown_chars.append((str(r["id"]), bad))
            continue
        if len(ids) > max_prompt_tokens:
            raise DataError(f"prompt of row '{r['id']}' has {len(ids)} tokens, over data.max_prompt_tokens="
                            f"{max_prompt_tokens}; shorten it or raise data.max_prompt_tokens")
        if not ids:
            raise DataError(f"prompt of row '{r['id']}' is empty after tokenization; remove the row or give it "
                            "a prompt")
        out.append(ids)
    if unknown_chars:
        listed = ", ".join(f"row '{i}': {chars}" for i, chars in unknown_chars[:MAX_LISTED])
        more = f" and {len(unknown_chars) - MAX_LISTED} more row(s)" if len(unknown_chars) > MAX_LISTED else ""
        raise DataError(f"{len(unknown_chars)} prompt(s) have characters outside the student's vocabulary (they "
                        f"would become <unk>): {listed}{more}; remove those characters or use a tokenizer that "
                        "covers them")
    return out


def check_domain_mix(rows: list[dict], mix: dict[str, float] | None) -> None:
    """`data.domain_mix` may only name domains the rows have (a typo would silently drop that domain)."""
    if not mix:
        return
    present = sorted({r["domain"] for r in rows})
    unknown = sorted(set(mix) - set(present))
    if unknown:
        raise DataError(f"data.domain_mix names domain(s) with no rows in data.train_files: {unknown}; the rows' "
                        f"domains are {present}: fix the name or drop it from data.domain_mix")
    if not any(float(mix.get(d, 0.0)) > 0 for d in present):
        raise DataError("data.domain_mix gives every domain weight 0")


class DomainMixSampler:
    def __init__(self, rows: list[dict], mix: dict[str, float] | None, seed: int) -> None:
        self.by_domain: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            self.by_domain.setdefault(r["domain"], []).append(i)
        self.domains = sorted(self.by_domain)
        check_domain_mix(rows, mix)
        if mix:
            w = np.array([float(mix.get(d, 0.0)) for d in self.domains])
        else:
            w = np.array([len(self.by_domain[d]) for d in self.domains], dtype=float)
        if w.sum() <= 0:
            raise DataError("data.domain_mix gives every domain weight 0")
        self.weights = w / w.sum()
        self.seed = seed

    def batch(self, step: int, size: int, weights: np.ndarray | None = None) -> list[int]:
        """Row indices for step `step`: domains drawn by the mix (or `weights`, over `self.domains`), rows
        uniformly within a domain."""
        rng = np.random.default_rng([self.seed, step])
        counts = rng.multinomial(size, self.weights if weights is None else weights)
        idx: list[int] = []
        for d, c in zip(self.domains, counts, strict=True):
            pool = self.by_domain[d]
            idx.extend(int(pool[j]) for j in rng.choice(len(pool), size=int(c), replace=len(pool) < c))
        return idx


class AutoMix:
    """Domain weights that follow the headroom left: each domain's teacher KL on the student's own samples
    (`mopd/teacher_kl/<domain>`, averaged over steps with `ema`), mixed with the static `base` weights:
    ``w = floor * base + (1 - floor) * kl / sum(kl)``. Why: a fixed mix either starves the domain the
    student is furthest from or has to be hand-tuned per world (Open-MOPD measures the starving).

    The weights for batch j come from the steps up to j - 1 - k exactly (k = trainer.max_staleness: the
    pipeline launches batch j once step j - 1 - k has trained), so the data order is a function of the
    logged metrics and resume replays it from `metrics.jsonl`. History is kept per step, so a step redone
    after a fault recomputes from the same past."""

    def __init__(self, domains: list[str], base: np.ndarray, ema: float, floor: float, staleness: int) -> None:
        self.domains, self.base, self.ema, self.floor, self.k = list(domains), np.asarray(base, float), ema, floor, staleness
        self.kl_after: dict[int, dict[str, float]] = {0: {}}  # step -> the per-domain KL average after it

    def observe(self, step: int, metrics: dict[str, Any]) -> None:
        """Fold step `step`'s per-domain teacher KL into the average (a domain absent from the batch keeps its
        value)."""
        prev = self.kl_after.get(step - 1)
        if prev is None:
            raise RuntimeError(f"auto mix: step {step} observed before step {step - 1}")
        cur = dict(prev)
        for d in self.domains:
            v = metrics.get(f"mopd/teacher_kl/{d}")
            if v is None or not np.isfinite(v):
                continue
            cur[d] = float(v) if d not in prev else self.ema * prev[d] + (1 - self.ema) * float(v)
        self.kl_after[step] = cur

    def weights_for(self, step: int) -> np.ndarray:
        """The sampling weights of batch `step` (1-based)."""
        src = step - 1 - self.k
        if src <= 0:
            return self.base
        kl = self.kl_after.get(src)
        if kl is None:
            raise RuntimeError(f"auto mix: batch {step} needs step {src}'s teacher KL, not observed yet")
        h = np.array([max(kl.get(d, 0.0), 0.0) for d in self.domains])
        if h.sum() <= 0 or len(kl) < int((self.base > 0).sum()):  # not every domain measured yet
            return self.base
        w = self.floor * self.base + (1 - self.floor) * h / h.sum()
        return w / w.sum()

    def replay(self, records: list[dict[str, Any]], upto: int) -> None:
        """Rebuild the history from a run's logged step records (resume)."""
        for m in sorted((r for r in records if "timing_s/step" in r and r["step"] <= upto), key=lambda r: r["step"]):
            self.observe(int(m["step"]), m)
