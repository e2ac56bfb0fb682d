"""Does the chain of thought matter? The long-reasoning world's teacher recipe trained on other targets.

    PYTHONPATH=. .venv/bin/python benchmarks/reason_trace.py [configs/quickstart_reason.yaml] [--answer-steps 2000]

The world (built first if missing) has the `swap` teacher trained on worked solutions: the tape of swaps after
every step, 261 characters, then `|` and the final arrangement (`mopd.world.tasks.swap_solution`). This trains
the same model (same initial weights, seeds, lr, batch, warm-up, SFT loop) on the same rows with other targets
and scores every one on the world's eval rows with the same verifier (exact match of the final answer, greedy):

- `answer`: the final arrangement alone, for the world teacher's steps and for `--answer-steps` (default 2000:
  about the trace teacher's wall time, an answer-only step being ~8x cheaper);
- `states`: the arrangements alone after every swap, `(ceabd) (deabc) ... |answer` (69 characters): a chain
  of thought whose step t must find swap t in the prompt, at a distance that grows with t, where the tape's
  every character is computed from characters a fixed distance back.

It prints one table with the world's own rows (teacher with the trace, student before) beside these.
Everything runs on `world.num_threads` torch threads, as the build does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def states_target(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the arrangements after every swap as its response (no tape), then `|` and the answer."""
    from mopd.world.tasks import FINAL, apply_swap

    cells = row["prompt"].removeprefix("swap:").removesuffix("=").split(",")
    state, out = cells[0].strip("()"), []
    for sw in cells[1:]:
        state = apply_swap(state, sw)
        out.append(f"({state})")
    return {**row, "answer": " ".join(out) + FINAL + row["answer"], "solution": None}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="benchmarks/reason_trace.py", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="configs/quickstart_reason.yaml")
    p.add_argument("--answer-steps", type=int, default=2000)
    p.add_argument("--domain", default="swap")
    args = p.parse_args(argv)

    import torch
    from transformers import PreTrainedTokenizerFast

    import mopd.world  # noqa: F401 - registers the world: section
    from mopd.config import load_config
    from mopd.report import markdown_table
    from mopd.world import world_config
    from mopd.world.accuracy import accuracy
    from mopd.world.build import _seed, build_world
    from mopd.world.models import build_teacher
    from mopd.world.sft import sft
    from mopd.world.tasks import read_jsonl

    wc = world_config(load_config(args.config))
    info = build_world(wc)
    root, d = Path(info["dir"]), args.domain
    train = [r for r in read_jsonl(root / info["paths"]["train"]) if r["domain"] == d]
    evals = [r for r in read_jsonl(root / info["paths"]["eval"]) if r["domain"] == d]
    tok = PreTrainedTokenizerFast.from_pretrained(str(root / info["paths"]["tokenizer"]))
    steps = wc.teacher_steps_by_domain.get(d, wc.teacher_steps)
    torch.set_num_threads(wc.num_threads)

    def run(name: str, rows: list[dict[str, Any]], n: int) -> list[Any]:
        model = build_teacher(tok, _seed(wc.seed, f"teacher/{d}/init"), max_position_embeddings=wc.max_positions,
                              **wc.teacher_size)
        t0 = time.perf_counter()
        hist = sft(model, tok, rows, n, wc.batch_size, wc.teacher_lr, _seed(wc.seed, f"teacher/{d}/sft"),
                   warmup_steps=wc.warmup_steps)
        wall = time.perf_counter() - t0
        acc = accuracy(model, tok, evals)[d]
        print(f"{name}: {n} steps, {wall:.0f} s, loss {hist['final_loss']:.4f}, accuracy {acc:.3f}", flush=True)
        return [name, len(rows[0]["answer"]), n, round(wall), acc]

    t_world = info["timings"][f"teacher/{d}"]["wall_s"]
    table = [[f"teacher, worked solution (the world's, {len(train[0]['solution'])} chars)",
              len(train[0]["solution"]), steps, round(t_world), info["accuracy"][f"teacher/{d}"][d]]]
    table.append(run("teacher, answer only", train, steps))
    table.append(run("teacher, answer only, more steps", train, args.answer_steps))
    table.append(run("teacher, arrangements only (no tape)", [states_target(r) for r in train], steps))
    table.append([f"student before (the world's warm-start, {wc.student_steps} steps on solutions)", "", "", "",
                  info["accuracy"]["student"][d]])
    print()
    print(markdown_table(["model", "target chars", "SFT steps", "SFT wall (s)", f"{d} accuracy"], table))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
