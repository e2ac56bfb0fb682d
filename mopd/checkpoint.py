"""Checkpoints: the student in Hugging Face format plus optimizer, scheduler, RNG and step, written
atomically under `RUN_DIR/checkpoints/step_N`; `latest` names the newest complete one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mopd.atomic import write_dir, write_text


def save_checkpoint(run_dir: Path, step: int, trainer: Any, tokenizer: Any, extra: dict | None = None) -> Path:
    target = run_dir / "checkpoints" / f"step_{step}"
    sd = trainer.state_dict()

    def fill(tmp: Path) -> None:
        trainer.unwrapped.save_pretrained(tmp / "model", state_dict=sd, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        if trainer.cfg.trainer.backend == "deepspeed":
            trainer.acc.save_state(str(tmp / "accelerate"))
        else:
            torch.save({"optimizer": trainer.opt.state_dict(), "scheduler": trainer.sched.state_dict()},
                       tmp / "optim.pt")
        # Batches and rollout seeds are functions of (seed, step); torch's RNG is the only other state.
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))

    write_dir(target, fill)
    write_text(run_dir / "checkpoints" / "latest", f"step_{step}\n")
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    p = run_dir / "checkpoints" / "latest"
    if not p.exists():
        return None
    ck = run_dir / "checkpoints" / p.read_text().strip()
    return ck if (ck / "state.json").exists() else None


def load_checkpoint(ck: Path, trainer: Any) -> dict:
    """Restore optimizer/scheduler/RNG into a trainer built from `ck/model`; returns state.json."""
    if trainer.cfg.trainer.backend == "deepspeed":
        trainer.acc.load_state(str(ck / "accelerate"))
    else:
        st = torch.load(ck / "optim.pt", weights_only=True)
        trainer.opt.load_state_dict(st["optimizer"])
        trainer.sched.load_state_dict(st["scheduler"])
    rng = torch.load(ck / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return json.loads((ck / "state.json").read_text())
