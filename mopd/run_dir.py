"""The run directory's contract with `mopd train`: never silently lose a run.

`prepare_run_dir` runs before anything else starts and decides, from what is on disk, between a fresh run
and a resume:

- a fresh run refuses a folder that already holds a run (`metrics.jsonl`, or a checkpoints folder with
  anything in it) unless `--overwrite` is given, which deletes that run's metrics, checkpoints, result
  files, dashboard and TensorBoard events (and says so); W&B / MLflow stores are kept (they keep runs apart);
- `--resume` needs something to resume from: `checkpoints/latest` naming a complete folder (one with
  `state.json`), or else the newest complete `step_N` (logged). Finding neither is an error saying what was
  found, never a silent fresh start over the old metrics;
- `--resume` takes the newest checkpoint that is intact (`checkpoint_problem`: a truncated `model.safetensors`
  or torch file is skipped with a WARNING line naming it and why); `--resume-from step_N` takes that one;
- temporaries a crash left under `checkpoints/` (`.step_N.tmp*`, `.*.old`, `.latest.*`) are removed, and a
  `.step_N.old` whose `step_N` is gone (a crash mid-swap) is put back;
- a run dir that is a file, cannot be created or is not writable is a `RunDirError` with a clear message;
- one process writes a run dir at a time (`mopd.run_lock`): `hold_run_dir` takes `RUN_DIR/.lock` for the whole
  run, and `prepare_run_dir` holds it while it deletes or cleans anything, so `--overwrite` never deletes a
  run another process is writing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mopd.checkpoint import (
    STEP_RE,
    checkpoint_problem,
    checkpoints_dir,
    complete_steps,
    intact_checkpoint,
    is_complete,
    resolve_latest,
)
from mopd.run_lock import RunDirError, RunDirLock, lock_run_dir

__all__ = ["RunDirError", "clean_stale", "hold_run_dir", "holds_run", "prepare_run_dir"]

# What a run writes and `--overwrite` deletes (config.yaml is rewritten by every start anyway).
RUN_FILES = ("metrics.jsonl", "result.json", "result.md", "dashboard.html")
RUN_DIRS = ("checkpoints", "tensorboard")

_TMP_RE = re.compile(r"\.step_\d+\.tmp.*")  # write_dir's temporaries and prune's renames
_OLD_RE = re.compile(r"\.(.+)\.old")  # write_dir's previous version during a swap
_LATEST_TMP_RE = re.compile(r"\.latest\..+")  # write_text's temporary for `latest`


def _is_stale(name: str) -> bool:
    return bool(_TMP_RE.fullmatch(name) or _OLD_RE.fullmatch(name) or _LATEST_TMP_RE.fullmatch(name))


def _remove(p: Path) -> None:
    """A folder with its contents, or a file or link (a link's target is left alone)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def holds_run(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a run already wrote there (empty: nothing)."""
    run_dir = Path(run_dir)
    found = []
    if (run_dir / "metrics.jsonl").exists():
        found.append("metrics.jsonl")
    ckdir = checkpoints_dir(run_dir)
    if ckdir.is_dir():
        if any(not _is_stale(p.name) for p in ckdir.iterdir()):
            found.append("checkpoints/")
    elif ckdir.exists():
        found.append("checkpoints")
    return found


def clean_stale(run_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove what an interrupted save or prune left under checkpoints/; returns the removed paths."""
    ckdir = checkpoints_dir(Path(run_dir))
    if not ckdir.is_dir():
        return []
    removed = []
    for p in sorted(ckdir.iterdir()):
        if not _is_stale(p.name):
            continue
        old = _OLD_RE.fullmatch(p.name)
        if old and STEP_RE.fullmatch(old.group(1)) and p.is_dir() and is_complete(p) \
                and not (ckdir / old.group(1)).exists():
            os.replace(p, ckdir / old.group(1))
            log(f"restored {ckdir / old.group(1)} from {p.name} (a save was interrupted while swapping it)")
            continue
        try:
            _remove(p)
        except OSError as e:
            raise RunDirError(f"cannot remove the stale temporary {p} left by an interrupted save: "
                              f"{e.strerror or e}") from e
        removed.append(p)
    if removed:
        log(f"removed {len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} left by an interrupted "
            f"checkpoint save under {ckdir}: {', '.join(p.name for p in removed)}")
    return removed


def _chosen(run_dir: Path, name: str) -> Path:
    """`--resume-from step_N` (or N): that checkpoint, complete and intact, or an error listing those there are."""
    ckdir = checkpoints_dir(run_dir)
    name = f"step_{name}" if name.isdigit() else name
    ck = ckdir / name
    have = ", ".join(p.name for _, p in complete_steps(ckdir)) or "none"
    if not STEP_RE.fullmatch(name) or not ck.is_dir():
        raise RunDirError(f"--resume-from {name}: no such checkpoint in {ckdir} (complete ones: {have}); "
                          "give one of them as step_N")
    if not is_complete(ck):
        raise RunDirError(f"--resume-from {name}: {ck} is incomplete (no state.json: its save was interrupted); "
                          f"give a complete one ({have})")
    problem = checkpoint_problem(ck)
    if problem:
        raise RunDirError(f"--resume-from {name}: {ck} is corrupt: {problem}; give another one ({have})")
    return ck


def _require_writable(d: Path, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".mopd-write-test.")
    except OSError as e:
        raise RunDirError(f"{what} {d} is not writable ({e.strerror or e}): fix its permissions or choose "
                          "another logging.run_dir") from e
    os.close(fd)
    os.unlink(probe)


def _require_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} is a file, not a folder: move it away or choose another "
                          "logging.run_dir")


def _check_request(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """What can be refused before anything is created."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in the run dir and --overwrite discards it: give one")
    _require_dir(run_dir)
    if resume and not run_dir.exists():
        raise RunDirError(f"--resume: run dir {run_dir} does not exist, so there is no run to resume "
                          "(drop --resume to start one)")


def _create(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run dir {run_dir}: {e.strerror or e}") from e


def hold_run_dir(run_dir: Path, resume: bool = False, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> RunDirLock:
    """Take the run dir's lock for a run asked with `resume` / `overwrite` (the request is checked first, so
    nothing is created for one that will be refused); a fresh run's folder is created. Raises RunDirError,
    or `RunDirBusy` naming the process that holds it. Release it with `.release()` or a `with` block."""
    run_dir = Path(run_dir)
    _check_request(run_dir, resume, overwrite)
    if not resume:
        _create(run_dir)
    return lock_run_dir(run_dir, log)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool,
                    log: Callable[[str], None] = print, resume_from: str | None = None) -> Path | None:
    """Make `run_dir` ready for a run; returns the checkpoint to resume from, or None for a fresh run.

    Raises RunDirError (a ValueError) when the folder cannot be used as asked, `RunDirBusy` when another
    process holds it. The lock is held while this runs (re-entrant: a caller that holds it keeps it). See the
    module docstring.
    """
    run_dir = Path(run_dir)
    resume = resume or resume_from is not None
    with hold_run_dir(run_dir, resume, overwrite, log):
        return _prepare(run_dir, resume, overwrite, log, resume_from)


def _prepare(run_dir: Path, resume: bool, overwrite: bool, log: Callable[[str], None],
             resume_from: str | None = None) -> Path | None:
    if resume:
        _require_writable(run_dir, "run dir")
        ckdir = checkpoints_dir(run_dir)
        if ckdir.is_dir():
            _require_writable(ckdir, "checkpoints folder")
            clean_stale(run_dir, log)
        if resume_from is not None:
            return _chosen(run_dir, resume_from)
        found = resolve_latest(run_dir)
        if found.path is None:
            has = holds_run(run_dir)
            seen = f" (it holds {', '.join(has)})" if has else ""
            raise RunDirError(f"--resume: nothing to resume in {run_dir}{seen}: {found.note}. Start over with "
                              "--overwrite (deletes that run) or choose another logging.run_dir")
        ck = intact_checkpoint(run_dir, lambda line: log(f"--resume: {line}"))
        if ck is None:
            raise RunDirError(f"--resume: no intact checkpoint in {ckdir}: every complete one is corrupt (see "
                              "the warnings above). Start over with --overwrite or choose another logging.run_dir")
        return ck

    _require_writable(run_dir, "run dir")
    present = holds_run(run_dir)
    if present and not overwrite:
        raise RunDirError(f"run dir {run_dir} already holds a run ({', '.join(present)}): continue it with "
                          "--resume, or delete it and start over with --overwrite (or choose another "
                          "logging.run_dir)")
    if overwrite:
        deleted = []
        for name in RUN_FILES + RUN_DIRS:
            p = run_dir / name
            if not (p.exists() or p.is_symlink()):
                continue
            try:
                _remove(p)
            except OSError as e:
                raise RunDirError(f"--overwrite: cannot delete {p}: {e.strerror or e}") from e
            deleted.append(name + ("/" if name in RUN_DIRS else ""))
        if deleted:
            log(f"--overwrite: deleted the previous run's {', '.join(deleted)} from {run_dir}")
    clean_stale(run_dir, log)
    return None
