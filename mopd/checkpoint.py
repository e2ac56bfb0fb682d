"""Checkpoints: the student in Hugging Face format plus optimizer, scheduler, RNG and step, written
atomically under `RUN_DIR/checkpoints/step_N`; `latest` names the newest complete one.

A folder is complete when it holds `state.json` (written last). `latest` is updated only after the folder
is in place, so a crash or a full disk mid-save leaves the previous checkpoint and `latest` as they were.
Should `latest` still name a folder that is gone or incomplete, the newest complete `step_N` is used
instead (`resolve_latest`, shared with `mopd.run_dir`). `keep` prunes older folders after a good save;
the one `latest` names and any folder holding a `best` marker file are never pruned.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mopd.atomic import write_dir, write_text

STEP_RE = re.compile(r"step_(\d+)")
BEST_MARKER = "best"  # a file of this name inside step_N protects it from pruning
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(OSError):
    """A checkpoint could not be written; the message says which folder and what is intact."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(ck: Path) -> bool:
    return (ck / "state.json").is_file()


def step_dirs(ckdir: Path) -> list[tuple[int, Path]]:
    """Every `step_N` folder under `ckdir` (complete or not), oldest first."""
    if not ckdir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckdir.iterdir()
           if (m := STEP_RE.fullmatch(p.name)) and p.is_dir()]
    return sorted(out)


def complete_steps(ckdir: Path) -> list[tuple[int, Path]]:
    return [(s, p) for s, p in step_dirs(ckdir) if is_complete(p)]


def latest_name(ckdir: Path) -> str | None:
    """What `latest` says, or None without one (an unreadable or empty file counts as none)."""
    try:
        name = (ckdir / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name or None


class Latest(NamedTuple):
    """What `resolve_latest` found: the checkpoint (None: nothing to resume from), how it was found or why
    there is none (text for the log), and whether `latest` was bypassed for the newest complete step_N."""

    path: Path | None
    note: str
    fallback: bool


def resolve_latest(run_dir: Path) -> Latest:
    """`latest` when it names a complete folder; otherwise the newest complete `step_N`, said in the note."""
    ckdir = checkpoints_dir(run_dir)
    if not ckdir.is_dir():
        what = "is not a folder" if ckdir.exists() else "does not exist"
        return Latest(None, f"{ckdir} {what}", False)
    name = latest_name(ckdir)
    if name is not None and "/" not in name and is_complete(ckdir / name):
        return Latest(ckdir / name, f"{ckdir}/latest names {name}", False)
    if name is None:
        why = f"{ckdir}/latest is missing" if not (ckdir / "latest").exists() else f"{ckdir}/latest is unreadable"
    elif not (ckdir / name).is_dir():
        why = f"{ckdir}/latest names {name}, which is missing"
    else:
        why = f"{ckdir}/latest names {name}, which is incomplete (no state.json)"
    done = complete_steps(ckdir)
    if not done:
        found = step_dirs(ckdir)
        tail = f"only {len(found)} step_N folder(s) without state.json" if found else "no step_N folder at all"
        return Latest(None, f"{why}, and there is no complete step_N folder (one with state.json): {tail}", False)
    return Latest(done[-1][1], f"{why}; falling back to the newest complete checkpoint {done[-1][1].name}", True)


def latest_checkpoint(run_dir: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint `latest` names, or the newest complete `step_N` when `latest` is dangling (logged)."""
    found = resolve_latest(run_dir)
    if found.fallback and log is not None:
        log(found.note)
    return found.path


def checkpoint_problem(ck: Path) -> str | None:
    """Why complete checkpoint `ck` cannot be resumed from (a truncated or garbled file), or None. Cheap: reads
    headers and sizes, not the tensors (a safetensors file must be exactly as long as its header says; torch
    files must be whole zip archives)."""
    try:
        json.loads((ck / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json is unreadable ({e})"
    model = ck / "model"
    for f in sorted(model.glob("*.safetensors")) if model.is_dir() else []:
        problem = _safetensors_problem(f)
        if problem:
            return f"model/{f.name} {problem}"
    for name in ("optim.pt", "rng.pt", "carry.pt"):  # a missing one is named by the load itself
        f = ck / name
        if f.is_file() and not zipfile.is_zipfile(f):
            return f"{name} is truncated or not a torch file ({f.stat().st_size} bytes)"
    return None


def _safetensors_problem(f: Path) -> str | None:
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"is truncated ({size} bytes; its header alone needs {8 + n})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        return f"has an unreadable header ({e})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"is truncated ({size} bytes; its header says {8 + n + end})"
    return None


def intact_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: `resolve_latest`'s, or, when that one is corrupt, the newest older
    complete one that is intact, with a warning naming each skipped checkpoint and why. None: none intact."""
    found = resolve_latest(run_dir)
    if found.path is None:
        return None
    if found.fallback:
        log(found.note)
    step = int(STEP_RE.fullmatch(found.path.name).group(1)) if STEP_RE.fullmatch(found.path.name) else None
    older = [p for s, p in reversed(complete_steps(checkpoints_dir(run_dir))) if step is None or s < step]
    for ck in [found.path, *older]:
        problem = checkpoint_problem(ck)
        if problem is None:
            return ck
        log(f"WARNING: skipping checkpoint {ck.name}: {problem}; trying the one before it")
    return None


def _disk_full(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if "no space left on device" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _previous(ckdir: Path) -> str:
    ck = resolve_latest(ckdir.parent).path
    if ck is None:
        return "there was no previous checkpoint"
    return f"the previous checkpoint {ck.name} is intact and {ckdir.name}/latest still names it" \
        if latest_name(ckdir) == ck.name else f"the previous checkpoint {ck.name} is intact"


def save_checkpoint(run_dir: Path, step: int, trainer: Any, tokenizer: Any, extra: dict | None = None,
                    keep: int = 0, state: tuple[dict, dict] | None = None, files: dict[str, Any] | None = None) -> Path:
    """Write `checkpoints/step_{step}` atomically, point `latest` at it, then prune beyond `keep` (0: none).

    `state`: the trainer's `(weights, optimizer state)` when already gathered (data-parallel workers gather
    them together, then one of them writes); by default read from `trainer.checkpoint_state()`. Both are
    whole (unsharded), so the checkpoint loads into any number of workers. `files`: more plain data to keep
    with it, `{name: data}` written with `torch.save` (e.g. the pipeline's carried batches, `mopd.carry`)."""
    ckdir = checkpoints_dir(run_dir)
    target = ckdir / f"step_{step}"
    sd, optim = state if state is not None else trainer.checkpoint_state()

    def fill(tmp: Path) -> None:
        trainer.unwrapped.save_pretrained(tmp / "model", state_dict=sd, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        torch.save(optim, tmp / "optim.pt")
        # Batches and rollout seeds are functions of (seed, step); torch's RNG is the only other state.
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        for name, data in (files or {}).items():
            torch.save(data, tmp / name)
        write_text(tmp / "state.json", json.dumps({"step": step, **(extra or {})}))  # last: marks it complete

    commit_checkpoint(run_dir, step, fill, keep=keep)
    return target


def commit_checkpoint(run_dir: Path, step: int, fill: Callable[[Path], None], keep: int = 0) -> Path:
    """The storage half of `save_checkpoint`: `fill(tmp)` writes the files (state.json last)."""
    ckdir = checkpoints_dir(run_dir)
    target = ckdir / f"step_{step}"
    try:
        write_dir(target, fill)
    except Exception as e:
        _raise_save_error(e, ckdir, target, f"writing checkpoint {target}")
    try:
        write_text(ckdir / "latest", f"{target.name}\n")
    except Exception as e:
        _raise_save_error(e, ckdir, target, f"{target} was written, but updating {ckdir}/latest")
    if keep > 0:
        prune_checkpoints(run_dir, keep)
    return target


def _raise_save_error(e: Exception, ckdir: Path, target: Path, what: str) -> None:
    prev = _previous(ckdir)
    if _disk_full(e):
        err = CheckpointError(f"no space left on device: {what} failed; {prev}. Free space under "
                              f"{ckdir} (or lower trainer.keep_checkpoints) and continue with --resume")
        err.errno = errno.ENOSPC
        raise err from e
    if isinstance(e, OSError):
        raise CheckpointError(f"{what} failed: {e}; {prev}") from e
    e.add_note(f"{what} failed; {prev}")
    raise e


def prune_checkpoints(run_dir: Path, keep: int, log: Callable[[str], None] | None = None) -> list[Path]:
    """Delete complete `step_N` folders older than the newest `keep`, except the one `latest` names and any
    holding a `best` marker. Each goes through a hidden `.step_N.tmp-prune` rename first, so a crash
    mid-delete never leaves a half-deleted folder that looks like a checkpoint. Returns what was removed."""
    if keep <= 0:
        return []
    ckdir = checkpoints_dir(run_dir)
    done = complete_steps(ckdir)
    protected = {latest_name(ckdir)}
    removed = []
    for _step, p in done[:-keep]:
        if p.name in protected or (p / BEST_MARKER).exists():
            continue
        doomed = p.with_name(f".{p.name}.tmp-prune")
        try:
            if doomed.exists():
                shutil.rmtree(doomed)
            os.replace(p, doomed)
            shutil.rmtree(doomed)
        except OSError as e:  # pruning is housekeeping: never fail a save over it
            if log is not None:
                log(f"could not prune {p}: {e}")
            continue
        removed.append(p)
        if log is not None:
            log(f"pruned {p} (keeping the newest {keep})")
    return removed


def load_checkpoint(ck: Path, trainer: Any) -> dict:
    """Restore optimizer/scheduler/RNG into a trainer built from `ck/model`; returns state.json."""
    if not (ck / "optim.pt").exists() and (ck / "accelerate").is_dir():
        trainer.load_legacy_state(str(ck / "accelerate"))  # a DeepSpeed checkpoint of mopd <= 0.14 (same worker count)
    else:
        trainer.load_optimizer_state(torch.load(ck / "optim.pt", weights_only=True))
    rng = torch.load(ck / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return json.loads((ck / "state.json").read_text())
