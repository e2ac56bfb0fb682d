"""Teacher preflight: everything about a teacher that would silently corrupt the dense reward, checked
on the live engines before step 1 (and by `mopd teachers check`).

A wrong tokenizer, a sharpened or unnormalised distribution, a top-k the server cannot return, a
non-deterministic or unreachable server: each of these either crashes a run hours in or, worse, trains
the student toward the wrong target without an error. Each check gives one line: ok/FAIL, the measured
figure and, on failure, how to fix it.

Works on Ray actor handles (training) and on plain in-process objects (`ServerTeacher` in the CLI)
alike: both expose `ready()`, `score()` and, for servers, `tokenize()`.

`check_model_folders` runs before any engine starts (training and `mopd teachers check`): every local model folder
(the student, or the checkpoint a resume loads, and each in-cluster teacher) must hold a `config.json` and
weights whose every tensor is finite, every teacher's `vocab_size` must serve the student's (`vocab_problem`),
and `algorithm.teacher_top_k` must fit the vocabulary. The live preflight repeats the vocabulary check on what
each engine or server reports (a `vllm_server` teacher's size is only known there). A NaN weight
would otherwise pass as a teacher that "is not deterministic" or a student that diverges at step 3.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from teachers.backends import get_teacher_backend
from teachers.http_teacher import serve_command
from teachers.pool import architecture_mismatch
from teachers.tokenizer_check import tokenizer_mismatch

# Scores of the same sequence may differ by float noise when a shared server batches it with other
# traffic; anything larger is a real non-determinism.
DETERMINISM_TOL = 1e-5
NORMALISED_TOL = 1e-3
PROBE_ROWS = 4


class PreflightError(RuntimeError):
    """At least one teacher failed its preflight; the message is the whole report."""


class ModelCheckError(ValueError):
    """A student or teacher model folder that cannot be used (missing, no config or weights, a non-finite
    weight, a teacher_top_k over its vocabulary); the message is one line naming the key and the fix."""


@dataclass
class Check:
    teacher: str
    name: str
    ok: bool
    figure: str
    hint: str = ""
    where: str = ""  # a replica (URL or index) when the check is per replica


@dataclass
class Probe:
    sequences: list[list[int]]
    prompt_lens: list[int]
    texts: list[str]  # for the server-side tokenization check
    # A multi-turn trajectory (prompt, student turn, observation, student turn) and the length of its first
    # student turn, when the teacher's domains have rows naming an environment; None otherwise.
    multi_turn: tuple[list[int], int, int] | None = None


def run_preflight(cfg: Any, teachers: dict[str, list[Any]], student_tokenizer: Any,
                  rows: list[dict] | None = None) -> list[Check]:
    """All checks for every teacher in `teachers` (name -> replica handles, in config order)."""
    # The engines' context: the longest prompt, the longest response and the one token a scoring request
    # generates (the same figure the engines are started with).
    need_len = cfg.data.max_prompt_tokens + cfg.rollout.response_budget + 1
    student = Path(str(cfg.student.path)).expanduser()
    student_vocab = config_vocab_size(student) if student.is_dir() else None
    out: list[Check] = []
    for name, handles in teachers.items():
        tcfg = cfg.teachers[name]
        probe = make_probe(student_tokenizer, rows or [], tcfg.domains, need_len)
        out += check_teacher(name, tcfg, handles, student_tokenizer, probe,
                             top_k=cfg.algorithm.teacher_top_k, need_len=need_len, student_vocab=student_vocab)
    return out


def check_teacher(name: str, tcfg: Any, handles: list[Any], student_tokenizer: Any, probe: Probe, *,
                  top_k: int, need_len: int, student_vocab: int | None = None) -> list[Check]:
    """Every check of one teacher's replicas; `student_vocab` (the student's config.json vocab_size, None:
    unknown) adds the vocabulary check."""
    server = get_teacher_backend(tcfg.backend).remote
    out = [_tokenizer_check(name, tcfg.path, student_tokenizer)]
    first: list[float] | None = None
    healthy: list[tuple[Any, dict]] = []
    for i, h in enumerate(handles):
        where = tcfg.urls[i] if server else f"replica {i}"
        try:
            info = _call(h, "ready")
        except Exception as e:  # noqa: BLE001 - a dead actor is reported like an unreachable server
            info = {"error": f"the engine actor failed: {_short(e)}"}
        if "error" in info:
            out.append(Check(name, "reachable", False, info["error"].split("; start it with")[0],
                             _reach_hint(name, tcfg, where, top_k), where))
            continue
        if info.get("vocab_size") is None:
            info["vocab_size"] = _vocab_size(tcfg.path)
        try:
            t0 = time.perf_counter()
            a = _logprobs(_call(h, "score", probe.sequences, probe.prompt_lens, 0))
            t1 = time.perf_counter()
            b = _logprobs(_call(h, "score", probe.sequences, probe.prompt_lens, 0))
            first_ms, ms = (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000
        except Exception as e:  # noqa: BLE001
            out.append(Check(name, "reachable", False, f"scoring a probe failed: {_short(e)}",
                             _reach_hint(name, tcfg, where, top_k), where))
            continue
        model = f"model {info['served_model']!r}, " if server else ""
        out.append(Check(name, "reachable", True,
                         f"{model}{ms:.1f} ms per probe request of {len(probe.sequences)} sequences "
                         f"(first request {first_ms:.1f} ms)", "", where))
        nonfinite = sum(not math.isfinite(x) for x in a + b)
        if nonfinite:  # determinism and normalisation mean nothing on NaN scores: their advice would mislead
            out.append(Check(name, "finite", False, f"non-finite log-probs: {nonfinite} of {len(a) + len(b)} "
                             "probe token log-probs are NaN or infinite", _nonfinite_hint(name, tcfg), where))
            continue
        out.append(Check(name, "finite", True, f"all {len(a) + len(b)} probe token log-probs finite", "", where))
        if server:
            out.append(_context_check(name, info, need_len, tcfg, where))
            out.append(_server_tokenization_check(name, h, student_tokenizer, probe.texts, tcfg, where))
        out.append(_max_logprobs_check(name, info, top_k, server, tcfg, where))
        if student_vocab is not None and info.get("vocab_size") is not None:
            out.append(_vocab_check(name, int(info["vocab_size"]), student_vocab, top_k, where))
        diff = _max_abs_diff(a, b)
        across = None if first is None else _max_abs_diff(first, a)
        first = a if first is None else first
        figure = f"same probe scored twice: max |diff| = {diff:.2g}"
        if across is not None:
            figure += f"; vs replica 0: {across:.2g}"
        worst = max(diff, across or 0.0)
        out.append(Check(name, "deterministic", worst <= DETERMINISM_TOL, figure,
                         "scores must not depend on batching or chance: serve the teacher without speculative "
                         "decoding or batch-variant kernels, and give all replicas the same model and dtype", where))
        healthy.append((h, info))
    if healthy:
        out.append(_normalised_check(name, *healthy[0], probe, server))
        if probe.multi_turn is not None:
            out.append(_multi_turn_check(name, healthy[0][0], probe.multi_turn))
    return out


# The same positions scored in two requests of different lengths: batch-shape noise only (bf16 engines
# reach ~1e-3), far below what a truncated or non-causal context does to them.
MULTI_TURN_TOL = 1e-2


def _multi_turn_check(name: str, h: Any, probe: tuple[list[int], int, int]) -> Check:
    """The teacher scores a whole multi-turn trajectory in one prefill (what training sends): its log-probs
    of the first student turn must be those it gives that turn alone, so the observation and the later turn
    behind it neither shift nor truncate the context."""
    seq, plen, first = probe
    try:
        whole = _logprobs(_call(h, "score", [seq], [plen], 0))[:first]
        alone = _logprobs(_call(h, "score", [seq[: plen + first]], [plen], 0))
    except Exception as e:  # noqa: BLE001
        return Check(name, "multi_turn", False, f"scoring a multi-turn trajectory failed: {_short(e)}",
                     "the teacher must take prompt + the whole trajectory (rollout.max_total_tokens) as one sequence")
    diff = _max_abs_diff(whole, alone)
    return Check(name, "multi_turn", diff <= MULTI_TURN_TOL,
                 f"a {len(seq) - plen}-token trajectory in one prefill vs its first turn alone: max |diff| = {diff:.2g}",
                 "the teacher's scores of an earlier turn changed with what follows it: it must score the sequence "
                 "causally, unshifted and untruncated")


def require_preflight(cfg: Any, teachers: dict[str, list[Any]], student_tokenizer: Any,
                      rows: list[dict] | None = None, log=print) -> list[Check]:
    """Run the preflight; raise `PreflightError` with the report if anything failed."""
    checks = run_preflight(cfg, teachers, student_tokenizer, rows)
    report = format_report(checks)
    if any(not c.ok for c in checks):
        raise PreflightError("teacher preflight failed (`mopd teachers check CONFIG` repeats it):\n" + report)
    log(report.splitlines()[-1])
    return checks


def format_report(checks: list[Check]) -> str:
    lines, teacher = [], None
    for c in checks:
        if c.teacher != teacher:
            teacher = c.teacher
            lines.append(f"teacher '{teacher}'")
        where = f" [{c.where}]" if c.where else ""
        lines.append(f"  {'ok' if c.ok else 'FAIL':<4}  {c.name:<14}{where} {c.figure}")
        if not c.ok and c.hint:
            lines.append(f"        fix: {c.hint}")
    failed = sum(not c.ok for c in checks)
    lines.append(f"teacher preflight: {len(checks) - failed} of {len(checks)} checks ok"
                 + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


# -- model folders and weights (before any engine starts) --------------------------------------------
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_CHUNK = 1 << 24  # elements per isfinite pass: bounded memory on a multi-GB embedding
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # `org/name`; absolute, ./ and deeper paths are local


def check_model_folders(cfg: Any, student_path: str | None = None, log: Callable[[str], None] | None = None, *,
                        weights: bool = True) -> list[str]:
    """Refuse unusable model folders before Ray or any engine starts; returns one line per folder checked.

    The student (or `student_path`: the checkpoint's `model` folder a resume loads) and every in-cluster
    (`backend: vllm` or `hf`) teacher must be a folder with `config.json` and weights (`*.safetensors`, or
    `pytorch_model*.bin`; every shard a `*.index.json` lists); with `weights` every floating tensor must be
    finite (this reads each checkpoint once); each teacher's config.json `vocab_size` must serve the student's
    (`vocab_problem`); `algorithm.teacher_top_k` must not exceed the vocabulary.
    A `vllm_server` teacher's path is only its tokenizer source: its weights live with the server.
    Raises `ModelCheckError` with every problem found, in one line.
    """
    resumed = student_path is not None and str(student_path) != str(cfg.student.path)
    folders = [("checkpoint" if resumed else "student.path", str(student_path or cfg.student.path), "student")]
    if resumed:  # the tokenizer still comes from student.path
        folders.append(("student.path", str(cfg.student.path), "student tokenizer source"))
    folders += [(f"teachers.{n}.path", t.path, f"teacher '{n}'") for n, t in cfg.teachers.items()
                if not get_teacher_backend(t.backend).remote]
    problems: list[str] = []
    lines: list[str] = []
    vocab: list[tuple[int, str, str]] = []
    t0 = time.perf_counter()
    for key, path, who in folders:
        folder, note = _local_folder(path)
        if folder is None:
            if note:
                problems.append(f"{key}={path!r} {note}")
            else:
                lines.append(f"{who}: {path} is not a local folder; treated as a Hugging Face hub id (not checked)")
            continue
        if who == "student tokenizer source":
            if not folder.is_dir():
                problems.append(f"{key}={path!r} is a file, not the student's model folder (its tokenizer is "
                                "loaded from there)")
            continue
        problem = model_folder_problem(folder)
        if problem:
            problems.append(f"{key}={path!r} {problem}")
            continue
        size = config_vocab_size(folder)
        if size is not None:
            vocab.append((size, who, path, key))
        if weights:
            try:
                bad = first_nonfinite_weight(folder)
            except WeightReadError as e:
                problems.append(f"{key}={path!r}: {e}: the checkpoint is corrupt or truncated; re-export it"
                                + (" or resume from an earlier checkpoint" if who == "student" else ""))
                continue
            if bad:
                problems.append(_nonfinite_weight_message(who, key, path, *bad, resumed=resumed))
                continue
        lines.append(f"{who}: {path}: config.json and weights present" + (", every weight finite" if weights else ""))
    top_k = int(cfg.algorithm.teacher_top_k)
    student = next(((size, key, path) for size, who, path, key in vocab if who == "student"), None)
    if student is not None:
        for size, who, path, key in vocab:
            problem = None if who == "student" else vocab_problem(size, student[0], top_k)
            if problem:
                problems.append(f"{key}={path!r} ({who}, config.json vocab_size {size}): {problem} ({student[1]}="
                                f"{student[2]!r} has vocab_size {student[0]})")
    if vocab and top_k > 0:
        size, who, path, _key = min(vocab)
        if top_k > size:
            problems.append(f"algorithm.teacher_top_k={top_k} is above the vocabulary size {size} ({who}, {path}): "
                            f"give at most {size}, or -1 for the whole vocabulary")
    if not problems:
        problems += pool_problems(cfg)
    if problems:
        raise ModelCheckError("; ".join(problems))
    lines.append(f"models checked in {time.perf_counter() - t0:.1f} s")
    if log is not None:
        log("model check: " + "; ".join(lines))
    return lines


def pool_problems(cfg: Any) -> list[str]:
    """A teacher pool's engines become each of its teachers by a weight load, so its teachers must share one
    architecture (config.json, less bookkeeping keys); one problem per pool that mixes them."""
    out = []
    for pool in getattr(cfg, "teacher_pools", {}):
        paths = {n: t.path for n, t in cfg.teachers.items() if t.pool == pool}
        problem = architecture_mismatch(paths)
        if problem:
            out.append(f"teacher_pools.{pool} mixes architectures: {problem}; one engine can only serve teachers of "
                       "one architecture: put the others in a pool of their own (teachers.<name>.pool) or give "
                       "them engines of their own (pool: null)")
    return out


def _local_folder(path: str) -> tuple[Path | None, str]:
    """(folder to check, "") for a local folder or a cached hub id; (None, problem) for a missing local path;
    (None, "") for a hub id that is not cached here (transformers/vLLM download it; nothing to check)."""
    p = Path(path).expanduser()
    if p.exists():
        return p, ""
    if _HUB_ID.fullmatch(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # noqa: BLE001 - not a valid repo id after all
            cached = None
        if isinstance(cached, str):
            return Path(cached).parent, ""
        offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        if not offline:
            return None, ""
        return None, ("does not exist and is not in the Hugging Face cache (HF_HUB_OFFLINE is set): point it at "
                      "a model folder or download it first")
    return None, ("does not exist: point it at a Hugging Face model folder (config.json, tokenizer files and "
                  "*.safetensors weights)")


def model_folder_problem(folder: str | Path) -> str | None:
    """What keeps `folder` from being a loadable Hugging Face model folder, or None."""
    p = Path(folder)
    if not p.is_dir():
        return "is a file, not a Hugging Face model folder (config.json, tokenizer files, *.safetensors)"
    if not (p / "config.json").is_file():
        return ("has no config.json, so it is not a Hugging Face model folder: save the model there with "
                "`save_pretrained` (config, weights and tokenizer)")
    try:
        json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        return f"has a config.json that is not valid JSON ({e}): re-save the model with `save_pretrained`"
    if not weight_files(p):
        return ("holds no weights (no *.safetensors or pytorch_model*.bin): a tokenizer or config alone cannot "
                "score or generate; save the model's weights there with `save_pretrained`")
    for index in sorted(p.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (ValueError, OSError, AttributeError) as e:
            return f"has an unreadable {index.name} ({e}): re-save the model with `save_pretrained`"
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            return (f"lacks {len(missing)} weight shard(s) that {index.name} lists ({', '.join(missing[:3])}): "
                    "the copy is incomplete; copy the missing files")
    return None


def weight_files(folder: str | Path) -> list[Path]:
    return sorted(f for pat in WEIGHT_PATTERNS for f in Path(folder).glob(pat) if f.is_file())


def config_vocab_size(folder: str | Path) -> int | None:
    """`vocab_size` from a model folder's config.json (or its `text_config`), None if it has none."""
    try:
        c = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    v = c.get("vocab_size") or (c.get("text_config") or {}).get("vocab_size")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


class WeightReadError(ValueError):
    """A weight file that cannot be read (truncated, not safetensors)."""


def first_nonfinite_weight(folder: str | Path) -> tuple[str, str, str] | None:
    """(file name, tensor name, "NaN" | "inf") of the first floating tensor with a non-finite value in a
    model folder's weight files, or None when every weight is finite. Reads every tensor once (lazily,
    one tensor at a time, in chunks)."""
    files = weight_files(folder)
    if any(f.suffix == ".safetensors" for f in files):  # what transformers and vLLM load when both are there
        files = [f for f in files if f.suffix == ".safetensors"]
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                        kind = _nonfinite_kind(sf.get_tensor(name))
                        if kind:
                            return f.name, name, kind
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad files
                raise WeightReadError(f"cannot read {f.name} ({_short(e)})") from None
        else:
            try:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
                    state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise WeightReadError(f"cannot read {f.name} ({_short(e)})") from None
            for name, t in state.items():
                kind = _nonfinite_kind(t) if isinstance(t, torch.Tensor) else None
                if kind:
                    return f.name, name, kind
    return None


def _nonfinite_kind(t: Any) -> str | None:
    if not t.is_floating_point():
        return None
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        c = flat[i:i + _CHUNK]
        if c.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            c = c.float()  # fp8 and friends: isfinite needs a standard float type
        if not bool(torch.isfinite(c).all()):
            return "NaN" if bool(torch.isnan(c).any()) else "inf"
    return None


def _nonfinite_weight_message(who: str, key: str, path: str, file: str, tensor: str, kind: str, *,
                              resumed: bool) -> str:
    if who == "student" and resumed:
        return (f"checkpoint weight {tensor} has {kind} ({path}/{file}): the run diverged before this save or the "
                "save is corrupt; resume from an earlier checkpoint (put its step_N name into checkpoints/latest) "
                "or start over with --overwrite")
    if who == "student":
        return (f"student weight {tensor} has {kind} ({key}={path}, {file}): the checkpoint is corrupt; re-export "
                "it or resume from an earlier checkpoint")
    return (f"{who} weight {tensor} has {kind} ({key}={path}, {file}): the checkpoint is corrupt; re-export it "
            "or point the key at a good copy")


def _nonfinite_hint(name: str, tcfg: Any) -> str:
    """Why a teacher returns NaN/inf log-probs: a non-finite weight in its folder, or else overflow."""
    server = get_teacher_backend(tcfg.backend).remote
    bad = None
    folder = Path(tcfg.path)
    if folder.is_dir() and weight_files(folder):
        try:
            bad = first_nonfinite_weight(folder)
        except WeightReadError:
            bad = None
    if bad is not None:
        file, tensor, kind = bad
        return (f"check the weights: teacher weight {tensor} has {kind} ({tcfg.path}/{file}): the checkpoint is "
                "corrupt; re-export it" + (" and restart the server on the fixed copy" if server else ""))
    if server:
        return ("check the served model's weights for NaN/inf (re-export a corrupt checkpoint), and serve it in "
                "bfloat16 or float32 rather than float16, which can overflow")
    return (f"check the weights: those in teachers.{name}.path are finite, so the forward overflows; score in "
            f"float32 (teachers.{name}.dtype=float32)")


# -- probes -----------------------------------------------------------------------------------------
def make_probe(tokenizer: Any, rows: list[dict], domains: list[str], max_len: int) -> Probe:
    """A few of the teacher's own training rows as prompt + reference answer (plain token ids)."""
    mine = [r for r in rows if r.get("domain") in domains] or rows
    seqs, plens, texts = [], [], []
    for r in mine[:PROBE_ROWS]:
        prompt = r.get("prompt")
        if not isinstance(prompt, str):
            continue
        p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ans = str(r.get("answer") or "")
        a = list(tokenizer(ans, add_special_tokens=False)["input_ids"]) if ans else []
        seq = (p + a)[: max_len - 1]
        if len(seq) < 2:
            continue
        plen = min(len(p), len(seq) - 1) if a else max(1, len(seq) // 2)
        seqs.append(seq)
        plens.append(max(1, plen))
        texts.append(prompt + ans)
    if not seqs:  # no usable rows: any valid ids score fine
        vocab = len(tokenizer)
        seqs, plens = [[i % vocab for i in range(1, 9)]], [4]
        texts = ["Hello, world! 0123456789"]
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        texts.append(texts[0] + eos)  # special tokens must map to the same ids too
    return Probe(seqs, plens, texts, _multi_turn_probe(tokenizer, [r for r in mine if r.get("env")], max_len))


def _multi_turn_probe(tokenizer: Any, rows: list[dict], max_len: int) -> tuple[list[int], int, int] | None:
    """prompt + first half of the answer + an observation + the rest, from the first row naming an env."""
    for r in rows:
        if not isinstance(r.get("prompt"), str):
            continue
        p = list(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        ans = list(tokenizer(str(r.get("answer") or "0 1"), add_special_tokens=False)["input_ids"]) or p[-2:]
        obs = list(tokenizer("=1", add_special_tokens=False)["input_ids"])
        first = max(1, len(ans) // 2)
        seq = (p + ans[:first] + obs + ans[first:] + ans[:first])[: max_len - 1]
        if len(seq) > len(p) + first:
            return seq, len(p), first
    return None


# -- individual checks ------------------------------------------------------------------------------
def _tokenizer_check(name: str, path: str, student_tokenizer: Any) -> Check:
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        return Check(name, "tokenizer", False, f"cannot load a tokenizer from {path!r}: {_short(e)}",
                     f"point teachers.{name}.path at the teacher's Hugging Face folder (its tokenizer files)")
    diff = tokenizer_mismatch(student_tokenizer, tok)
    if diff:
        return Check(name, "tokenizer", False, f"{path}: {diff}",
                     "a teacher must use the student's tokenizer exactly (vocabulary and special tokens): use a "
                     "teacher of the same tokenizer family or re-save it with the student's tokenizer")
    return Check(name, "tokenizer", True, f"identical to the student's (vocabulary {len(tok.get_vocab())}, "
                                          f"special tokens {sorted(tok.special_tokens_map)})")


def _server_tokenization_check(name: str, h: Any, student_tokenizer: Any, texts: list[str], tcfg: Any,
                               where: str) -> Check:
    try:
        for text in texts:
            theirs = _call(h, "tokenize", text)
            ours = list(student_tokenizer(text)["input_ids"])
            if theirs != ours:
                return Check(name, "tokenization", False,
                             f"{text[:40]!r}: server {theirs[:12]} vs student {ours[:12]}",
                             f"the server loaded another tokenizer than teachers.{name}.path; start it with "
                             f"--tokenizer {tcfg.path} (or serve a teacher that shares the student's tokenizer)", where)
    except Exception as e:  # noqa: BLE001
        return Check(name, "tokenization", False, f"/tokenize failed: {_short(e)}",
                     "the preflight needs vLLM's /tokenize endpoint; serve the teacher with `vllm serve`", where)
    return Check(name, "tokenization", True, f"server tokenizes {len(texts)} probe texts like the student", "", where)


def _context_check(name: str, info: dict, need: int, tcfg: Any, where: str) -> Check:
    have = info.get("max_model_len")
    ok = have is None or have >= need
    return Check(name, "context", ok, f"max_model_len {have} (need {need} = data.max_prompt_tokens + "
                                      "rollout.max_tokens + 1)",
                 f"restart the server with --max-model-len {need}, or lower data.max_prompt_tokens / "
                 "rollout.max_tokens", where)


def _max_logprobs_check(name: str, info: dict, top_k: int, server: bool, tcfg: Any, where: str) -> Check:
    vocab = info.get("vocab_size")
    need = vocab if top_k < 0 else top_k
    have = info.get("max_logprobs")
    what = "the whole vocabulary" if top_k < 0 else f"top-{top_k}" if top_k else "the sampled token only"
    ok = have is not None and need is not None and have >= need
    hint = (f"restart the server with --max-logprobs {need}" if server else
            "the in-cluster engine sizes max_logprobs from algorithm.teacher_top_k; lower teacher_top_k")
    return Check(name, "max_logprobs", ok, f"{have} >= {need} needed (algorithm.teacher_top_k={top_k}: {what})"
                 if ok else f"{have} < {need} needed (algorithm.teacher_top_k={top_k}: {what})", hint, where)


def vocab_problem(teacher_vocab: int, student_vocab: int, top_k: int) -> str | None:
    """Why a teacher's vocabulary (its model's `vocab_size`, padding included) cannot serve this student, or
    None. Smaller than the student's: the student can sample ids the teacher has no row for. Larger: fine for
    the sampled token alone (`teacher_top_k` 0), but a top-k or whole-vocabulary objective would read teacher
    log-probs of ids the student has no logit for (the loss refuses them at step 1)."""
    if teacher_vocab == student_vocab or (teacher_vocab > student_vocab and top_k == 0):
        return None
    if teacher_vocab < student_vocab:
        return (f"its vocabulary ({teacher_vocab} ids) is smaller than the student's ({student_vocab}): the student "
                "can sample ids the teacher cannot score; use a teacher whose vocab_size equals the student's")
    return (f"its vocabulary ({teacher_vocab} ids) is larger than the student's ({student_vocab}): with "
            f"algorithm.teacher_top_k={top_k} the loss reads the teacher's log-probs of ids the student has no "
            "logit for; use a teacher whose vocab_size equals the student's, or score the sampled token only "
            "(algorithm.objective=pg with algorithm.teacher_top_k=0)")


def _vocab_check(name: str, have: int, student_vocab: int, top_k: int, where: str) -> Check:
    problem = vocab_problem(have, student_vocab, top_k)
    figure = f"vocab_size {have}, the student's {student_vocab}"
    if problem is None and have != student_vocab:
        figure += " (larger: only the sampled token is scored, algorithm.teacher_top_k=0)"
    return Check(name, "vocabulary", problem is None, figure, (problem or "").split(": ", 1)[-1], where)


def _normalised_check(name: str, h: Any, info: dict, probe: Probe, server: bool) -> Check:
    """Scoring requests go out at temperature 1 and must come back as log-probs of the model's own
    distribution: over the whole vocabulary they sum to one. Raw logits, or a processed (temperature-
    scaled, top-p-truncated) mode on the server, fail here."""
    vocab, have = info.get("vocab_size"), info.get("max_logprobs") or 0
    full = vocab is not None and have >= vocab
    k = -1 if full else have
    hint = ("serve the teacher with the default --logprobs-mode raw_logprobs (not *_logits or processed_*)"
            if server else "the engine must return raw log-probs (logprobs_mode raw_logprobs)")
    if k == 0:
        return Check(name, "normalised", True, "temperature 1.0 sent; not measurable (max_logprobs 0)")
    try:
        # Two tokens, one scored position: a whole-vocabulary answer for every position of a long
        # sequence would be huge for a real vocabulary.
        sc = _call(h, "score", [probe.sequences[0][:2]], [1], k)[0]
        lps = [x for x in sc.topk_logprobs[0].tolist() if x > -math.inf]
    except Exception as e:  # noqa: BLE001
        return Check(name, "normalised", False, f"top-k probe failed: {_short(e)}", hint)
    lse = _logsumexp(lps)
    if full:
        return Check(name, "normalised", abs(lse) <= NORMALISED_TOL,
                     f"temperature 1.0 sent; log-sum-exp over all {len(lps)} tokens at one position = {lse:.2g}", hint)
    return Check(name, "normalised", lse <= NORMALISED_TOL,
                 f"temperature 1.0 sent; log-sum-exp of the top-{len(lps)} = {lse:.3g} <= 0 (partial check: "
                 f"max_logprobs {have} < vocabulary {vocab})", hint)


# -- helpers ----------------------------------------------------------------------------------------
def _call(handle: Any, method: str, *args: Any) -> Any:
    fn = getattr(handle, method)
    if hasattr(fn, "remote"):
        return ray.get(fn.remote(*args))
    return fn(*args)


def _reach_hint(name: str, tcfg: Any, where: str, top_k: int) -> str:
    hint = get_teacher_backend(tcfg.backend).start_hint
    serve = serve_command(tcfg.path, where, _vocab_size(tcfg.path) or "VOCAB") if "{serve_command}" in hint else ""
    return hint.format(name=name, where=where, serve_command=serve)


def _vocab_size(path: str) -> int | None:
    try:
        return int(AutoConfig.from_pretrained(path).vocab_size)
    except Exception:  # noqa: BLE001 - a tokenizer-only folder has no model config
        return None


def _logprobs(scores: list[Any]) -> list[float]:
    return [x for s in scores for x in s.logprobs]


def _max_abs_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:400]
