"""The batches a checkpoint carries: with `trainer.max_staleness: k`, the batches of steps N+1..N+k were
sampled by policies N-k..N-1 before step N's checkpoint, and no later run can sample them again (those weights
are gone). A checkpoint keeps them (`carry.pt`: samples, engine log-probs and teacher scores, as plain lists and
tensors, read back with `weights_only=True`), so a resumed run, or a trainer rebuilt after a fault, trains on
exactly the batches the uninterrupted run trained on.

A carry is tied to what produced it (`carry_key`: the data, rollout, teachers' scoring and batch shape); a run
whose config changed any of that drops it and samples afresh (said in the log).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mopd.batch import build_batch
from mopd.config import MopdConfig, to_dict
from mopd.producer import StepBatch
from mopd.samples import ScoredSample
from rollout.types import Sample

CARRY_FILE = "carry.pt"
_SCORED = [f.name for f in dataclasses.fields(ScoredSample) if f.name not in ("row", "sample")]
_SAMPLE = [f.name for f in dataclasses.fields(Sample)]


def carry_key(cfg: MopdConfig) -> str:
    """What a carried batch depends on besides the weights: the data, the rollout, the teachers and their
    scoring, the batch shape and the staleness bound it was sampled under."""
    c = to_dict(cfg)
    parts = {k: c[k] for k in ("data", "rollout", "teachers", "algorithm", "student")}
    parts["trainer"] = {k: c["trainer"][k] for k in ("seed", "prompts_per_step", "max_staleness")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plain(v: Any) -> Any:
    return torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v


def _unplain(v: Any) -> Any:
    return v.numpy() if isinstance(v, torch.Tensor) else v


def encode(batches: dict[int, StepBatch], key: str) -> dict:
    """Plain data (lists, numbers, strings, tensors) that `torch.load(weights_only=True)` reads back."""
    out = {"key": key, "batches": []}
    for step, sb in sorted(batches.items()):
        samples = [{"row_id": s.row["id"], **{k: _plain(getattr(s, k)) for k in _SCORED},
                    "sample": {k: _plain(getattr(s.sample, k)) for k in _SAMPLE}} for s in sb.samples]
        out["batches"].append({"step": step, "row_ids": list(sb.row_ids), "samples": samples,
                               "metrics": json.dumps({k: v for k, v in sb.metrics.items()
                                                      if not k.startswith("timing_s/")})})
    return out


def decode(data: dict, rows: list[dict], pad_id: int) -> dict[int, StepBatch]:
    """`encode`'s batches back, their samples pointing at this run's `rows` (by id)."""
    by_id = {r["id"]: r for r in rows}
    out = {}
    for b in data["batches"]:
        samples = [ScoredSample(row=by_id[s["row_id"]], sample=Sample(**{k: _unplain(v) for k, v in s["sample"].items()}),
                                **{k: _unplain(s[k]) for k in _SCORED if k in s}) for s in b["samples"]]
        out[int(b["step"])] = StepBatch(int(b["step"]), samples, build_batch(samples, pad_id), list(b["row_ids"]),
                                        json.loads(b["metrics"]))
    return out


def load_carry(ck: Path, cfg: MopdConfig, rows: list[dict], pad_id: int,
               log: Callable[[str], None] = print) -> dict[int, StepBatch]:
    """The batches checkpoint `ck` carries for this run; empty (said in the log when it matters) when it
    carries none or they were produced under another config."""
    f = Path(ck) / CARRY_FILE
    if not f.is_file():
        if cfg.trainer.max_staleness > 0:
            log(f"{ck.name} carries no pipelined batches (written by an older mopd, or at the run's last step): "
                "the steps right after it resample theirs with its weights (not bit-exact)")
        return {}
    data = torch.load(f, weights_only=True)
    if data.get("key") != carry_key(cfg):
        log(f"{ck.name}'s pipelined batches were produced under another data/rollout/teacher/staleness config: "
            "dropped; the steps after it sample afresh")
        return {}
    try:
        return decode(data, rows, pad_id)
    except KeyError as e:
        log(f"{ck.name}'s pipelined batches name row {e} that this run's data lacks: dropped")
        return {}
