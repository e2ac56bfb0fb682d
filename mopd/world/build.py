"""Build (or reuse) the quickstart world: data, tokenizer, one dense teacher per domain, MoE student.

Everything is derived from the `WorldConfig` by seeds and step counts, never by wall-clock, so the same
config on the same thread count rebuilds byte-identical data and weights. The build is cached: a
`world.json` whose config hash matches means the world is complete and is returned at once. It is
written into a temporary folder next to the target and swapped in by rename only when every stage has
finished, so an interrupted build can never leave a half world that looks complete.

    python -m mopd.world.build [--dir D] [--seed S] [--force]

On a shared machine run it with `OMP_WAIT_POLICY=PASSIVE` (set before torch is imported): two OpenMP
threads that spin-wait while other processes hold the cores made SFT steps 5-10x slower here. The
setting does not change the weights; `num_threads` does (it is part of the config hash).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from mopd.world.accuracy import accuracy
from mopd.world.config import WorldConfig
from mopd.world.models import build_student, build_teacher, num_params, save_model
from mopd.world.sft import sft
from mopd.world.tasks import GENERATORS, make_splits, read_jsonl, sft_target, write_jsonl
from mopd.world.tokenizer import build_tokenizer, save_tokenizer

# Bump whenever a change here, in the tasks, the tokenizer, the models or the SFT loop would produce a
# different world from the same config: cached worlds with the old version are then rebuilt.
CODE_VERSION = "world-v2"
MANIFEST = "world.json"


# Fields added after worlds were first built: hashed only when set away from their defaults, so that the worlds
# built before them (which these defaults reproduce) stay valid.
LATER_FIELDS = ("max_positions", "teacher_size", "student_size", "plain_teachers")


def config_hash(cfg: WorldConfig) -> str:
    """Hash of what determines the world's contents: every field except its location, plus the code."""
    default = WorldConfig()
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k != "dir" and not (k in LATER_FIELDS and v == getattr(default, k))}
    blob = json.dumps({"code_version": CODE_VERSION, "world": fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_world(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete world at `path`, or None if there is none (or it is unreadable)."""
    try:
        info = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    info["dir"] = str(Path(path).resolve())
    return info


def _seed(base: int, name: str) -> int:
    # Independent, stable seeds per stage so adding a domain does not reshuffle the others.
    return int.from_bytes(hashlib.sha256(f"{base}/{name}".encode()).digest()[:4], "little")


@contextmanager
def _threads(n: int) -> Iterator[None]:
    # Fixed thread count: CPU matmul reductions (and so the weights) depend on it.
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class _Clock:
    """Wall and CPU seconds per stage; CPU time is the figure to compare on a shared, loaded machine."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        yield
        self.stages[name] = {"wall_s": round(time.perf_counter() - w, 2),
                             "cpu_s": round(time.process_time() - c, 2)}


def _check_domains(cfg: WorldConfig) -> None:
    unknown = [d for d in [*cfg.domains, *cfg.plain_teachers] if d not in GENERATORS]
    if unknown or not cfg.domains:
        raise ValueError(f"world.domains {list(cfg.domains)}: unknown {unknown}; known domains: {sorted(GENERATORS)}")


def _warm_start(cfg: WorldConfig, tok: Any, train: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """The world's student: built at `world.student_size` and warm-started by a short SFT on the mixture
    (`world.student_mix`; worked solutions where a domain has them)."""
    model = build_student(tok, _seed(cfg.seed, "student/init"), max_position_embeddings=cfg.max_positions,
                          **cfg.student_size)
    counts = {d: sum(r["domain"] == d for r in train) for d in cfg.domains}
    weights = [cfg.student_mix.get(r["domain"], 1.0) / counts[r["domain"]] for r in train]
    hist = sft(model, tok, [sft_target(r) for r in train], cfg.student_steps, cfg.batch_size, cfg.student_lr,
               _seed(cfg.seed, "student/sft"), warmup_steps=min(cfg.warmup_steps, cfg.student_steps // 4),
               weights=weights)
    return model, hist


def _build_into(out: Path, cfg: WorldConfig, log: Callable[[str], None]) -> dict[str, Any]:
    clock = _Clock()
    t_all = time.perf_counter(), time.process_time()
    domains = list(cfg.domains)

    with clock.stage("data"):
        train, evals = make_splits(domains, cfg.train_rows_per_domain, cfg.eval_rows_per_domain, cfg.seed)
        (out / "data").mkdir(parents=True)
        write_jsonl(train, out / "data" / "train.jsonl")
        write_jsonl(evals, out / "data" / "eval.jsonl")
        tok = build_tokenizer(cfg.max_positions)
        save_tokenizer(tok, out / "tokenizer")
    log(f"[world] data: {len(train)} train / {len(evals)} eval rows over {domains}")

    table: dict[str, dict[str, float]] = {}
    params: dict[str, int] = {}
    final_loss: dict[str, float] = {}
    # (name, domain, plain): each domain's teacher on its worked solution or tool trajectory where it has one,
    # then the plain ones (the bare answer) of world.plain_teachers, which the table compares against.
    teachers = [(d, d, False) for d in domains] + [(f"{d}-plain", d, True) for d in cfg.plain_teachers]
    for name, d, plain in teachers:
        rows = [sft_target(r, plain=plain) for r in train if r["domain"] == d]
        with clock.stage(f"teacher/{name}"):
            # The plain teacher starts from the same init and sees the same batches: only the targets differ.
            model = build_teacher(tok, _seed(cfg.seed, f"teacher/{d}/init"), max_position_embeddings=cfg.max_positions,
                                  **cfg.teacher_size)
            hist = sft(model, tok, rows, cfg.teacher_steps_by_domain.get(d, cfg.teacher_steps), cfg.batch_size,
                       cfg.teacher_lr, _seed(cfg.seed, f"teacher/{d}/sft"), warmup_steps=cfg.warmup_steps)
            save_model(model, tok, out / "teachers" / name)
        with clock.stage(f"eval/teacher/{name}"):
            # A plain teacher is only scored on its own domain (it was trained for nothing else).
            table[f"teacher/{name}"] = accuracy(model, tok, [r for r in evals if r["domain"] == d] if plain else evals)
        params["teacher"] = num_params(model)
        final_loss[f"teacher/{name}"] = round(hist["final_loss"], 4)
        log(f"[world] teacher {name}: {clock.stages[f'teacher/{name}']['wall_s']:.1f} s, "
            f"loss {hist['final_loss']:.3f}, acc {table[f'teacher/{name}']}")

    with clock.stage("student"):
        model, hist = _warm_start(cfg, tok, train)
        save_model(model, tok, out / "student")
    with clock.stage("eval/student"):
        table["student"] = accuracy(model, tok, evals)
    params["student"] = num_params(model)
    final_loss["student"] = round(hist["final_loss"], 4)
    log(f"[world] student: {clock.stages['student']['wall_s']:.1f} s, loss {hist['final_loss']:.3f}, "
        f"acc {table['student']}")

    warnings = []
    for d in domains:
        own = table[f"teacher/{d}"][d]
        if own < 0.9:
            warnings.append(f"teacher {d} scores {own:.2f} on its own domain (< 0.90)")
        if table["student"][d] >= own:
            warnings.append(f"student scores {table['student'][d]:.2f} on {d}, not below its teacher ({own:.2f})")
    for w in warnings:
        log(f"[world] WARNING: {w}")

    clock.stages["total"] = {"wall_s": round(time.perf_counter() - t_all[0], 2),
                             "cpu_s": round(time.process_time() - t_all[1], 2)}
    return {
        "code_version": CODE_VERSION,
        "config_hash": config_hash(cfg),
        "config": dataclasses.asdict(cfg),
        "domains": domains,
        "paths": {"tokenizer": "tokenizer", "train": "data/train.jsonl", "eval": "data/eval.jsonl",
                  "student": "student", "teachers": {name: f"teachers/{name}" for name, _, _ in teachers}},
        "plain_teachers": list(cfg.plain_teachers),
        "accuracy": table,
        "final_loss": final_loss,
        "num_params": params,
        "timings": clock.stages,
        "torch_threads": torch.get_num_threads(),
        "warnings": warnings,
    }


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` by the finished `tmp` with renames, so readers see an old or a new world only."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


class WorldDirError(ValueError):
    """world.dir cannot take a world (a folder this project did not build); the message says what to do."""


def build_world(cfg: WorldConfig, force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Return the manifest of the world at `cfg.dir`, building it first unless a matching one exists.

    The manifest (`world.json`) holds the config and its hash, per-stage timings (wall and CPU seconds),
    and the accuracy table: `accuracy["teacher/<d>"][<domain>]` for every teacher on every domain and
    `accuracy["student"][<domain>]`. Paths in it are relative to `dir`, which is added on return.
    """
    _check_domains(cfg)
    target = Path(cfg.dir)
    info = load_world(target)
    if info is not None and info.get("config_hash") == config_hash(cfg) and not force:
        return info
    if info is None and target.is_dir() and any(target.iterdir()):
        # Never swap away (and delete) a folder we did not build, e.g. a mistyped world.dir.
        raise WorldDirError(f"world.dir={target} exists, is not empty and holds no {MANIFEST}, so it is not a "
                            "world this project built; refusing to replace it: choose another world.dir (an empty "
                            "or new folder) or move that folder away")
    if info is not None and not force:
        log(f"[world] {target}: config or code changed, rebuilding")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _threads(cfg.num_threads):
            manifest = _build_into(tmp, cfg, log)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = manifest["timings"]["total"]
    log(f"[world] built {target} in {t['wall_s']:.1f} s wall ({t['cpu_s']:.1f} s CPU)")
    return load_world(target) or manifest


def build_student_for(cfg: WorldConfig, path: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Another student for the built world at `cfg.dir` (e.g. a bigger one: `cfg.student_size`), warm-started
    on that world's rows exactly as the world's own student is (`cfg.student_steps`, `student_lr`, mix), saved
    to `path` with a `student.json` of its figures. Only the student fields of `cfg` (and `num_threads`) may
    differ from the world's: the data, tokenizer and positions are the world's. Cached like a world: a
    `student.json` with the same config hash is returned at once."""
    world = load_world(cfg.dir)
    if world is None:
        raise ValueError(f"no world at {cfg.dir}: build it first (mopd world build CONFIG)")
    student_fields = {"student_size", "student_steps", "student_lr", "student_mix", "num_threads"}
    built = {**dataclasses.asdict(WorldConfig()), **world["config"]}  # a world from before later fields: defaults
    own, asked = ({k: v for k, v in fields.items() if k not in student_fields | {"dir"}}
                  for fields in (built, dataclasses.asdict(cfg)))
    if own != asked:
        raise ValueError(f"build_student_for: only {sorted(student_fields)} may differ from the world at {cfg.dir}")
    target = Path(path)
    stamp = target / "student.json"
    try:
        info = json.loads(stamp.read_text())
        if info.get("config_hash") == config_hash(cfg):
            return info
    except (OSError, ValueError):
        pass
    root = Path(world["dir"])
    train = read_jsonl(root / world["paths"]["train"])
    evals = read_jsonl(root / world["paths"]["eval"])
    tok = PreTrainedTokenizerFast.from_pretrained(str(root / world["paths"]["tokenizer"]))
    clock = _Clock()
    with _threads(cfg.num_threads):
        with clock.stage("student"):
            model, hist = _warm_start(cfg, tok, train)
        with clock.stage("eval/student"):
            acc = accuracy(model, tok, evals)
    shutil.rmtree(target, ignore_errors=True)
    save_model(model, tok, target)
    info = {"config_hash": config_hash(cfg), "student_size": cfg.student_size, "num_params": num_params(model),
            "accuracy": acc, "final_loss": round(hist["final_loss"], 4), "timings": clock.stages,
            "world": world["dir"]}
    stamp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log(f"[world] student for {cfg.dir} at {target}: {info['num_params'] / 1e6:.1f}M parameters, "
        f"{clock.stages['student']['wall_s']:.0f} s, acc {acc}")
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mopd.world.build", description=__doc__.split("\n")[0])
    p.add_argument("--dir", default=WorldConfig.dir)
    p.add_argument("--seed", type=int, default=WorldConfig.seed)
    p.add_argument("--force", action="store_true", help="rebuild even if a matching world exists")
    args = p.parse_args(argv)
    info = build_world(WorldConfig(dir=args.dir, seed=args.seed), force=args.force)
    acc = info["accuracy"]
    domains = info["domains"]
    print(f"{'model':<14}" + "".join(f"{d:>8}" for d in domains))
    for name in [f"teacher/{d}" for d in domains] + ["student"]:
        print(f"{name:<14}" + "".join(f"{acc[name][d]:>8.3f}" for d in domains))


if __name__ == "__main__":
    main()
