"""Peer benchmark: one single-teacher on-policy distillation task run with TRL's `DistillationTrainer` and
with mopd, scored by one exact reverse-KL function, printed as one table with the mopd/TRL ratios.

    .venv/bin/pip install -c constraints/cpu.txt trl==1.16.0          # once; or the extra: ... -e '.[peer]'
    .venv/bin/python benchmarks/peer_trl.py [--steps 300] [--mopd-steps 600] [--prompts 32] [--max-new-tokens 8]
                                            [--lr 3e-3] [--eval-every 25] [--teacher-backend hf|vllm] [--threads 2]
                                            [--ray-niceness N] [--seeds 0,1,2,3,4,5] [key=value ...]

TRL is not a dependency of mopd: the `peer` extra holds it, `make test` never installs it and no test imports
it. With the constraints file the install adds trl, datasets, multiprocess, pandas, python-dateutil and tzdata
and leaves torch, transformers and accelerate as they are.

The task (the quickstart world, built first if missing): 2-digit addition, the warm-started tiny Qwen3-MoE
student, the dense Qwen3 addition teacher. Both sides get the same prompt token ids in the same order (mopd's
own sampler draws each step's rows; TRL reads them as an unshuffled dataset, and both sides check the ids),
the same steps, prompts per step, constant lr (AdamW, no warm-up, grad clip 1), max new tokens and
temperature, fp32, one sample per prompt, and the same loss: exact full-vocabulary reverse KL(student ||
teacher) at every response position of the student's own samples, token-mean over the batch (TRL: `beta=1`;
mopd: `objective=reverse_kl`, `teacher_top_k=-1`, `loss_agg_mode=token-mean`), both distributions tempered by
the sampling temperature when it is not 1 (mopd: `algorithm.kl_temperature`). mopd keeps its IcePop
correction (no-op here: fp32 engine and trainer) and runs its teacher on the `hf` backend by default
(`--teacher-backend vllm` for a vLLM teacher engine). Extra `key=value` arguments override mopd's config.

The defaults are the issue's settings (300 steps x 32 prompts, 8 new tokens, lr 3e-3, temperature 1); the
whole benchmark takes 3-6 minutes on two shared cores, a third of it scoring. At lr 3e-3 (constant, no warm-up)
the warm-started quickstart student's KL rises on both sides within 25 steps and stays above its start for
300 steps; `--lr 3e-4` descends (about 6 -> 1-1.5 nats per sequence), the run to read "wall to reach" from.
Both sides run with OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=2 unless set (the Makefile's), `--threads` torch
threads; Ray runs mopd's actors at niceness 15 (`--ray-niceness 0` to match TRL's process on a busy machine).

Each side runs in its own subprocess, so their memory never mixes. Training wall: TRL, the `train()` loop
from its first step to its last; mopd, the sum of `timing_s/step` (rollout, teacher, old_log_prob, train,
sync); neither counts model loading, engine start-up, evaluations or the checkpoints taken for scoring.
Tokens/s: generated response tokens (EOS included) / training wall. Memory: TRL, the peak RSS of its one
process; mopd, its logged `perf/mem_gb/total` (summed peak RSS of the driver and every actor) and
`perf/pss_gb/total` (summed PSS of the whole process tree, Ray's daemons included); PSS and process counts
for both also come from a sampler over each side's process tree.

`--preset long` measures long responses instead: the long-reasoning world's `swap` domain
(`configs/quickstart_reason.yaml`, whose teacher writes a 261-token chain of thought), 272 new tokens allowed, a
bigger Qwen3-MoE student (LONG_STUDENT: 13.4M parameters, 4 layers, hidden 256, top-2 of 16 experts; built
and warm-started on the world's rows like the world's own student, `mopd.world.build.build_student_for`, and
cached in .cache/peer_trl_long_student), lr 1e-3 (at the defaults' 3e-3 the KL rises on every side here: 218 ->
500-1,700 nats per sequence in 30 steps; at 1e-3 it falls to ~100), 30 steps for TRL and 40 for mopd (so that a
mopd run which reaches TRL's final KL later still says when), checkpoints every 5 steps scored on 32 prompts x
2 samples with a KV cache, and mopd run twice, synchronous (k=0, the comparison's mopd column) and
one-step-off (k=1, `trainer.max_staleness=1`, its own run: `--mopd-k1`). It adds a table of
mean response length, response tokens/s and s/step for TRL and both mopd runs. Every flag still overrides the
preset's value; everything else is the defaults'.

Scoring, after both runs and outside their timings: `reverse_kl` below, the same function for the initial
student and every checkpoint of both sides (every `--eval-every` steps): on `--eval-prompts` addition eval
prompts (never trained on), `--eval-samples` continuations per prompt sampled from the student at
temperature 1 (a fixed seed, the same for every model scored), the exact full-vocabulary KL(student ||
teacher) at every response position up to and including EOS, from plain transformers forwards in fp32.
Reported per sequence (the sum over its positions: the sequence-level reverse KL) and per token. "Wall to
reach TRL's final KL" is the training wall at the first checkpoint whose sequence KL is at or below the KL
of TRL's final model; mopd keeps training past TRL's last step (`--mopd-steps`, default twice `--steps`, on
further prompts from its sampler; with a constant lr the extra steps change nothing before them), so it can
reach that KL later than TRL's step count. Neighbouring checkpoints swing by ~0.5 nats at these settings, so
the same is also printed on 3-checkpoint trailing means. The equal-steps rows (wall, tokens/s, KL at step
`--steps`) compare the two on the same work. With `--mopd-k1` the k=1 run's checkpoints are scored too.

`--seeds` repeats the whole comparison per seed and ends with the spread: the paired mopd - TRL differences,
and each side's mean [min, max] over the seeds of the KL at a third, two thirds and all of `--steps`, of the
training wall to TRL's final KL and of the training wall, both as multiples of TRL's; and whether each mopd
run's mean KL lies inside TRL's range at those checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("runs/peer_trl")
STAGES = ["rollout", "teacher", "old_log_prob", "train", "sync", "other"]

# The task: a world (the world: section of a shipped config) and one of its domains. `student`: None uses the
# world's own student; otherwise another one built for that world (mopd.world.build.build_student_for).
TASKS: dict[str, dict[str, Any]] = {
    "add": {"config": "configs/quickstart.yaml", "domain": "add", "student": None},
    "swap": {"config": "configs/quickstart_reason.yaml", "domain": "swap", "student": "long"},
}
# The long preset's student: a bigger Qwen3-MoE (13.4M parameters, 2.4M active per token: 4 layers, hidden 256,
# top-2 of 16 experts of 256) warm-started on the world's worked solutions for 100 steps like the world's own
# student (218 s here, once): it writes the long chain's format with drifting arrangements (3% of answers right).
# Two threads (the world's own build uses one).
LONG_STUDENT = {"dir": ".cache/peer_trl_long_student", "student_steps": 100, "num_threads": 2,
                "student_size": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
                                 "num_key_value_heads": 4, "num_experts": 16, "moe_intermediate_size": 256,
                                 "intermediate_size": 1024}}
PRESETS: dict[str, dict[str, Any]] = {
    "long": {"task": "swap", "steps": 30, "mopd_steps": 40, "max_new_tokens": 272, "eval_every": 5, "lr": 1e-3,
             "eval_prompts": 32, "eval_samples": 2, "mopd_k1": True},
}


# ---------------------------------------------------------------------------------------------- memory
class TreeSampler:
    """Summed RSS and PSS and the number of processes of this process and all its descendants, sampled every
    `every_s` seconds in a background thread; the peaks are kept."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.peak = {"rss_gb": 0.0, "pss_gb": 0.0, "processes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        rss = pss = 0.0
        procs = [me, *me.children(recursive=True)]
        for p in procs:
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            except psutil.Error:
                continue
        self.peak["rss_gb"] = max(self.peak["rss_gb"], rss / 1024**3)
        self.peak["pss_gb"] = max(self.peak["pss_gb"], pss / 1024**3)
        self.peak["processes"] = max(self.peak["processes"], len(procs))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()


def _peak_rss_gb() -> float:
    """Peak RSS of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ---------------------------------------------------------------------------------------------- the plan
def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _task_world(task: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The task's world section (every field, as its config resolves it) and its data.max_prompt_tokens."""
    import dataclasses

    import mopd.world  # noqa: F401 - registers the world: section
    from mopd.config import load_config
    from mopd.world import world_config

    cfg = load_config(task["config"])
    return dataclasses.asdict(world_config(cfg)), cfg.data.max_prompt_tokens


def _mopd_yaml(args: argparse.Namespace, data_dir: Path) -> str:
    task = TASKS[args.task]
    d = task["domain"]
    world, max_prompt_tokens = _task_world(task)
    teacher = {"path": f"${{world.dir}}/teachers/{d}", "domains": [d], "backend": args.teacher_backend}
    student = LONG_STUDENT["dir"] if task["student"] == "long" else "${world.dir}/student"
    cfg = {
        "experiment": "peer_trl",
        "world": world,
        "student": {"path": student},
        "teachers": {f"{d}_teacher": teacher},
        "data": {"train_files": [str(data_dir / f"train_{d}.jsonl")], "eval_files": [str(data_dir / f"eval_{d}.jsonl")],
                 "eval_size_per_domain": 32, "max_prompt_tokens": max_prompt_tokens},
        "rollout": {"n": 1, "max_tokens": args.max_new_tokens, "temperature": args.temperature, "num_engines": 1,
                    "num_cpus_per_engine": 0.25, "kv_cache_gb": 0.125},
        # kl_temperature: TRL's loss tempers both distributions by the sampling temperature; so does mopd's here.
        "algorithm": {"objective": "reverse_kl", "teacher_top_k": -1, "correction": "icepop",
                      "loss_agg_mode": "token-mean", "kl_temperature": args.temperature},
        "trainer": {"steps": args.mopd_steps, "prompts_per_step": args.prompts, "lr": args.lr, "lr_schedule": "constant",
                    "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.0, "seed": args.seed,
                    "save_every": args.eval_every, "eval_every": 0, "max_wallclock_s": 0, "num_cpus": 1,
                    "num_threads": args.threads},
        "logging": {"run_dir": str(WORK / "mopd"), "progress_bar": False, "dashboard_every": 0},
    }
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


def make_plan(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Build the world (and the task's own student) if needed, write the task domain's data and mopd's config,
    and draw every step's prompts with mopd's own sampler (so TRL trains on exactly the prompts mopd will)."""
    import dataclasses

    from transformers import AutoTokenizer

    from mopd.config import load_config
    from mopd.data import DomainMixSampler, encode_rows, load_rows
    from mopd.producer import rows_digest
    from mopd.world import world_config
    from mopd.world.build import build_student_for, build_world, load_world

    data_dir = WORK / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (WORK / "mopd.yaml").write_text(_mopd_yaml(args, data_dir))
    cfg = load_config(WORK / "mopd.yaml", overrides)  # a bad override fails here, before anything runs
    task = TASKS[args.task]
    d = task["domain"]
    build_world(world_config(cfg))
    if task["student"] == "long":
        size = {k: v for k, v in LONG_STUDENT.items() if k != "dir"}
        info = build_student_for(dataclasses.replace(world_config(cfg), **size), LONG_STUDENT["dir"])
        print(f"student: {LONG_STUDENT['dir']}, {info['num_params'] / 1e6:.1f}M parameters, warm-start accuracy "
              f"{info['accuracy']}", flush=True)
    world = load_world(world_config(cfg).dir)
    train_rows = [r for r in load_rows([f"{world['dir']}/data/train.jsonl"]) if r["domain"] == d]
    eval_rows = [r for r in load_rows([f"{world['dir']}/data/eval.jsonl"]) if r["domain"] == d]
    _write_jsonl(train_rows, data_dir / f"train_{d}.jsonl")
    _write_jsonl(eval_rows, data_dir / f"eval_{d}.jsonl")

    tok = AutoTokenizer.from_pretrained(cfg.student.path)
    rows = load_rows(cfg.data.train_files)  # as mopd's train() reads them
    ids = encode_rows(tok, rows, cfg.data.max_prompt_tokens, cfg.data.add_special_tokens)
    sampler = DomainMixSampler(rows, cfg.data.domain_mix, cfg.trainer.seed)
    steps = []
    for s in range(1, cfg.trainer.steps + 1):
        idx = sampler.batch(s - 1, cfg.trainer.prompts_per_step)  # what BatchProducer.get(s) draws
        steps.append({"texts": [rows[i]["prompt"] for i in idx], "ids": [ids[i] for i in idx],
                      "digest": rows_digest([rows[i]["id"] for i in idx])})
    evals = eval_rows[:args.eval_prompts]
    return {
        "steps": args.steps, "mopd_steps": cfg.trainer.steps, "prompts": cfg.trainer.prompts_per_step, "lr": cfg.trainer.lr,
        "max_new_tokens": cfg.rollout.max_tokens, "temperature": cfg.rollout.temperature, "seed": cfg.trainer.seed,
        "eval_every": args.eval_every, "threads": args.threads, "student": cfg.student.path,
        "teacher": cfg.teachers[f"{d}_teacher"].path, "teacher_backend": str(cfg.teachers[f"{d}_teacher"].backend),
        "task": args.task, "mopd_config": str(WORK / "mopd.yaml"), "overrides": overrides, "step_prompts": steps,
        "eval_ids": encode_rows(tok, evals, cfg.data.max_prompt_tokens, cfg.data.add_special_tokens),
    }


# ---------------------------------------------------------------------------------------------- TRL side
def run_trl(plan: dict[str, Any], out: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(plan["threads"])
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    steps, every = plan["steps"], plan["eval_every"]
    texts = [t for s in plan["step_prompts"][:steps] for t in s["texts"]]
    tok = AutoTokenizer.from_pretrained(plan["student"], padding_side="left")
    if tok(text=texts)["input_ids"] != [i for s in plan["step_prompts"][:steps] for i in s["ids"]]:
        raise RuntimeError("TRL's tokenization of the prompts differs from mopd's prompt ids")
    student = AutoModelForCausalLM.from_pretrained(plan["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(plan["teacher"], dtype=torch.float32)
    stage = {"rollout": 0.0, "teacher": 0.0}
    counts = {"tokens": 0, "steps_checked": 0}

    class Trainer(DistillationTrainer):
        """Counts generated tokens, checks each step's prompt ids, times generation and the teacher forward."""

        def _generate(self, prompts: list) -> Any:
            t0 = time.perf_counter()
            out_ = super()._generate(prompts)
            stage["rollout"] += time.perf_counter() - t0
            prompt_ids, completion_ids = out_[0], out_[1]
            want = plan["step_prompts"][self.state.global_step]["ids"]
            if [list(p) for p in prompt_ids] != want:
                raise RuntimeError(f"TRL step {self.state.global_step + 1}: prompt ids differ from mopd's")
            counts["steps_checked"] += 1
            counts["tokens"] += sum(len(c) for c in completion_ids)
            return out_

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            counts.setdefault("train_kl", []).append(float(loss.detach()))  # token-mean reverse KL of the batch
            return loss

        def _get_last_hidden_state(self, unwrapped_model: Any, *a: Any, **kw: Any) -> Any:
            if torch.is_grad_enabled():  # the student's forward
                return super()._get_last_hidden_state(unwrapped_model, *a, **kw)
            t0 = time.perf_counter()
            h = super()._get_last_hidden_state(unwrapped_model, *a, **kw)
            stage["teacher"] += time.perf_counter() - t0
            return h

    class Clock(TrainerCallback):
        """Loop wall from the first step; snapshots for scoring are saved here and their time taken out."""

        def __init__(self) -> None:
            self.t0, self.excluded, self.points = 0.0, 0.0, []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
            now = time.perf_counter()
            self.wall = now - self.t0 - self.excluded
            s = state.global_step
            if s % every == 0 or s == steps:
                path = out / f"step_{s}.safetensors"
                save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
                self.points.append({"step": s, "wall_s": self.wall, "path": str(path)})
                self.excluded += time.perf_counter() - now

    clock = Clock()
    args = DistillationConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=plan["prompts"], gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=plan["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", max_completion_length=plan["max_new_tokens"],
        temperature=plan["temperature"], top_p=1.0, top_k=0, beta=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, shuffle_dataset=False, seed=plan["seed"], use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=max(1, steps // 10), disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=student, teacher_model=teacher, args=args, processing_class=tok, callbacks=[clock],
                      train_dataset=Dataset.from_dict({"prompt": texts}))
    with TreeSampler() as mem:
        trainer.train()
    if counts["steps_checked"] != steps:
        raise RuntimeError(f"TRL generated {counts['steps_checked']} batches for {steps} steps")
    wall = clock.wall
    return {"wall_s": wall, "tokens": counts["tokens"], "points": clock.points, "train_kl": counts["train_kl"],
            "response_length": counts["tokens"] / len(texts),
            "stages": {"rollout": stage["rollout"] / steps, "teacher": stage["teacher"] / steps,
                       "train+other": (wall - stage["rollout"] - stage["teacher"]) / steps},
            "peak_rss_gb": _peak_rss_gb(), "tree": mem.peak, "total_s": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------- mopd side
def run_mopd(plan: dict[str, Any], out: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """mopd on the plan's steps; `extra` overrides (the k=1 side's `trainer.max_staleness=1` and run dir) go last."""
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(plan["threads"])
    import mopd.world  # noqa: F401 - registers the world: section mopd.yaml has
    from mopd.config import load_config
    from mopd.jsonl import read_metrics
    from mopd.ray_cluster import cluster_address, init_ray
    from mopd.train import train

    cfg = load_config(plan["mopd_config"], [*plan["overrides"], *(extra or [])])
    temp_dir = None
    if cluster_address(cfg.ray.address) is None:
        # The private cluster train() would start, under a temp dir of its own: with Ray's shared /tmp/ray, a
        # cluster someone else started on this machine (`ray start`) would be joined instead.
        temp_dir = tempfile.mkdtemp(prefix="peer_trl_ray_", dir="/tmp")
        init_ray(None, cfg.ray.num_cpus, cfg.ray.host, log_to_driver=cfg.ray.log_to_driver, temp_dir=temp_dir)
    try:
        with TreeSampler() as mem:
            train(cfg, log=lambda line: print(line, flush=True), overwrite=True)  # a benchmark re-runs into one folder
    finally:
        if temp_dir:
            import ray

            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    run_dir = Path(cfg.logging.run_dir)
    recs = [m for m in read_metrics(run_dir / "metrics.jsonl") if "timing_s/step" in m]
    if len(recs) != plan["mopd_steps"]:
        raise RuntimeError(f"mopd logged {len(recs)} steps, expected {plan['mopd_steps']}")
    for m, s in zip(recs, plan["step_prompts"], strict=True):
        if int(m["data/rows_digest"]) != s["digest"]:
            raise RuntimeError(f"mopd step {m['step']}: its prompts differ from the plan's")
    cum, points = 0.0, []
    for m in recs:
        cum += m["timing_s/step"]
        ck = run_dir / "checkpoints" / f"step_{m['step']}" / "model"
        if ck.is_dir():
            points.append({"step": m["step"], "wall_s": cum, "path": str(ck)})
    later = recs[1:] or recs  # the first step is warm-up
    names = {k.removeprefix("timing_s/") for m in later for k in m if k.startswith("timing_s/")} | set(STAGES)
    stages = {s: statistics.mean(m.get(f"timing_s/{s}", 0.0) for m in later) for s in names}
    stages["step"] = statistics.mean(m["timing_s/step"] for m in later)
    stages["first_step"] = recs[0]["timing_s/step"]
    equal = recs[:plan["steps"]]  # the steps TRL also ran: wall and tokens/s at equal work
    return {"wall_s": sum(m["timing_s/step"] for m in equal), "wall_all_s": cum,
            "train_kl": [m["distillation/reverse_kl"] for m in equal],
            "tokens": sum(m["perf/tokens_per_s"] * m["timing_s/step"] for m in equal),
            "response_length": statistics.mean(m["response_length/mean"] for m in equal),
            "points": points, "stages": stages,
            "mem_gb_total": max(m.get("perf/mem_gb/total", 0.0) for m in recs),
            "pss_gb_total": max(m.get("perf/pss_gb/total", 0.0) for m in recs),
            "tree": mem.peak, "peak_rss_gb": _peak_rss_gb(), "total_s": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------- scoring
def reverse_kl(student: Any, teacher: Any, prompt_ids: list[list[int]], max_new_tokens: int, samples: int = 4,
               temperature: float = 1.0, seed: int = 1234, eos_id: int | None = None,
               pad_id: int = 0, use_cache: bool = False) -> tuple[float, float]:
    """Exact full-vocabulary reverse KL(student || teacher), averaged over `samples` continuations per prompt
    sampled from the student at `temperature` with a fixed seed: per position `sum_v p_s(v) (log p_s(v) -
    log p_t(v))` of the raw (temperature-1) distributions, over every response position up to and including
    the first EOS. Returns (mean per sequence of the summed KL, mean per token). Prompts are batched by
    length, so no prompt is padded; continuations are decoded without a KV cache (exact, and short), or with one
    (`use_cache`: long continuations; the KL itself still comes from one full forward of each model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    seq_kls: list[torch.Tensor] = []
    tok_sum, tok_n = 0.0, 0
    by_len: dict[int, list[list[int]]] = {}
    for p in prompt_ids:
        by_len.setdefault(len(p), []).append(p)
    with torch.no_grad():
        for length in sorted(by_len):
            x = torch.tensor(by_len[length], dtype=torch.long).repeat_interleave(samples, dim=0)
            alive = torch.ones(len(x), dtype=torch.bool)
            mask = torch.zeros(len(x), max_new_tokens)
            past = None
            for t in range(max_new_tokens):
                if use_cache:
                    step = student(input_ids=x if past is None else x[:, -1:], past_key_values=past, use_cache=True)
                    logits, past = step.logits[:, -1].float(), step.past_key_values
                else:
                    logits = student(input_ids=x).logits[:, -1].float()
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g).squeeze(1)
                nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
                mask[:, t] = alive.float()
                x = torch.cat([x, nxt[:, None]], dim=1)
                if eos_id is not None:
                    alive &= nxt != eos_id
                if not alive.any():
                    mask = mask[:, :t + 1]
                    break
            n = mask.shape[1]
            ls = torch.log_softmax(student(input_ids=x).logits[:, length - 1:length - 1 + n].float(), -1)
            lt = torch.log_softmax(teacher(input_ids=x).logits[:, length - 1:length - 1 + n].float(), -1)
            kl_bt = (ls.exp() * (ls - lt)).sum(-1) * mask
            seq_kls.append(kl_bt.sum(1))
            tok_sum += float(kl_bt.sum())
            tok_n += int(mask.sum())
    return float(torch.cat(seq_kls).mean()), tok_sum / max(tok_n, 1)


def score(plan: dict[str, Any], results: dict[str, dict], args: argparse.Namespace) -> dict[str, list[dict]]:
    """The initial student and every checkpoint of TRL, mopd (k=0) and, when it ran, mopd k=1, through
    `reverse_kl`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(plan["threads"])
    tok = AutoTokenizer.from_pretrained(plan["student"])
    teacher = AutoModelForCausalLM.from_pretrained(plan["teacher"], dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(plan["student"], dtype=torch.float32).eval()

    def load(path: str) -> Any:
        """A TRL snapshot (the in-memory state dict) or a mopd checkpoint (a Hugging Face folder)."""
        if not path.endswith(".safetensors"):
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.load_state_dict(load_file(path), strict=True)
        return model

    def kl_of(m: Any) -> tuple[float, float]:
        return reverse_kl(m, teacher, plan["eval_ids"], plan["max_new_tokens"], samples=args.eval_samples,
                          temperature=plan["temperature"], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                          use_cache=plan["max_new_tokens"] > 64)

    seq0, tok0 = kl_of(model)  # the initial student, before any snapshot is loaded into `model`
    curves = {}
    for side in [x for x in SIDES if x in results]:
        res = results[side]
        curves[side] = [{"step": 0, "wall_s": 0.0, "seq_kl": seq0, "tok_kl": tok0}]
        for p in res["points"]:
            seq, tk = kl_of(load(p["path"]))
            curves[side].append({"step": p["step"], "wall_s": p["wall_s"], "seq_kl": seq, "tok_kl": tk})
            print(f"  scored {side} step {p['step']}: reverse KL {seq:.3f} / sequence, {tk:.4f} / token", flush=True)
    return curves


# ---------------------------------------------------------------------------------------------- report
SIDES = ("trl", "mopd", "mopd_k1")
SIDE_LABELS = {"trl": "TRL", "mopd": "mopd k=0", "mopd_k1": "mopd k=1"}


def _reach(curve: list[dict], target: float) -> float | None:
    return next((p["wall_s"] for p in curve[1:] if p["seq_kl"] <= target), None)


def _smoothed(curve: list[dict], width: int = 3) -> list[dict]:
    """The curve with each checkpoint's KL replaced by the mean of it and the `width - 1` before it: one
    checkpoint's KL swings by ~0.5 nats between neighbours (the training noise of 32-prompt steps), so a single
    lucky checkpoint must not decide "reached"."""
    out = []
    for i, p in enumerate(curve):
        window = curve[max(1, i - width + 1):i + 1] if i else [p]
        out.append({**p, "seq_kl": statistics.mean(q["seq_kl"] for q in window)})
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(plan: dict[str, Any], res: dict[str, dict], curves: dict[str, list[dict]]) -> str:
    trl, mopd = res["trl"], res["mopd"]
    n, m_steps = plan["steps"], plan.get("mopd_steps", plan["steps"])
    end = {"trl": curves["trl"][-1], "mopd": next(p for p in curves["mopd"] if p["step"] == n)}  # equal steps
    target = end["trl"]["seq_kl"]
    reach = {s: _reach(curves[s], target) for s in ("trl", "mopd")}  # mopd: over all its steps
    worse = max(end["trl"]["seq_kl"], end["mopd"]["seq_kl"])  # a level both runs reach
    reach_worse = {s: _reach(curves[s], worse) for s in ("trl", "mopd")}
    rows: list[tuple[str, Any, Any, str]] = [
        (f"training wall, {n} steps (s)", trl["wall_s"], mopd["wall_s"], ".1f"),
        ("response tokens/s", trl["tokens"] / trl["wall_s"], mopd["tokens"] / mopd["wall_s"], ",.0f"),
        ("s/step", trl["wall_s"] / n, mopd["wall_s"] / n, ".3f"),
        ("reverse KL / seq, start", curves["trl"][0]["seq_kl"], curves["mopd"][0]["seq_kl"], ".3f"),
        (f"reverse KL / seq, step {n}", end["trl"]["seq_kl"], end["mopd"]["seq_kl"], ".3f"),
        (f"reverse KL / token, step {n}", end["trl"]["tok_kl"], end["mopd"]["tok_kl"], ".4f"),
    ]
    if m_steps > n:
        rows.append((f"reverse KL / seq, mopd step {m_steps} ({mopd['wall_all_s']:.1f} s)", None,
                     curves["mopd"][-1]["seq_kl"], ".3f"))
    smooth = {side: _smoothed(curves[side]) for side in ("trl", "mopd")}
    s_target = smooth["trl"][-1]["seq_kl"]
    rows += [
        (f"wall to reach TRL's final KL {target:.3f} (s)", reach["trl"], reach["mopd"], ".1f"),
        (f"same, 3-checkpoint means: TRL's final {s_target:.3f} (s)", _reach(smooth["trl"], s_target),
         _reach(smooth["mopd"], s_target), ".1f"),
        (f"wall to reach the higher step-{n} KL {worse:.3f} (s)", reach_worse["trl"], reach_worse["mopd"], ".1f"),
        ("peak RSS summed (GB)", trl["peak_rss_gb"], mopd["mem_gb_total"], ".2f"),
        ("PSS summed, peak (GB)", trl["tree"]["pss_gb"], mopd["pss_gb_total"], ".2f"),
        ("processes", trl["tree"]["processes"], mopd["tree"]["processes"], "d"),
        ("end-to-end process wall (s)", trl["total_s"], mopd["total_s"], ".1f"),
    ]
    lines = ["| metric | TRL | mopd | mopd/TRL |", "|---|---|---|---|"]
    for name, a, b, spec in rows:
        ratio = f"{b / a:.2f}" if a and b is not None else "-"
        lines.append(f"| {name} | {_fmt(a, spec)} | {_fmt(b, spec)} | {ratio} |")
    return "\n".join(lines)


def length_table(plan: dict[str, Any], res: dict[str, dict]) -> str:
    """Response length and throughput of every side that ran (TRL, mopd k=0, and mopd k=1 when it ran)."""
    sides = [(name, label) for name, label in (("trl", "TRL"), ("mopd", "mopd k=0"), ("mopd_k1", "mopd k=1"))
             if name in res]
    n = plan["steps"]
    rows = [("mean response length (tokens, EOS included)", lambda r: r["response_length"], ".1f"),
            ("response tokens/s", lambda r: r["tokens"] / r["wall_s"], ",.0f"),
            ("s/step", lambda r: r["wall_s"] / n, ".2f"),
            (f"training wall, {n} steps (s)", lambda r: r["wall_s"], ".1f"),
            ("on-policy training KL / token, mean", lambda r: statistics.mean(r["train_kl"][:n]), ".4f")]
    lines = ["| " + " | ".join(["metric", *(label for _, label in sides)]) + " |", "|---" * (len(sides) + 1) + "|"]
    for name, fn, spec in rows:
        lines.append(f"| {name} | " + " | ".join(format(fn(res[side]), spec) for side, _ in sides) + " |")
    return "\n".join(lines)


def stage_table(res: dict[str, dict]) -> str:
    ms, ts = res["mopd"]["stages"], res["trl"]["stages"]
    lines = ["| stage (mean s/step) | TRL | mopd |", "|---|---|---|"]
    lines.append(f"| rollout (generation) | {ts['rollout']:.4f} | {ms['rollout']:.4f} |")
    if "wait_rollout" in ms:  # mopd's pipeline: what the step waited for the stage (all of it when synchronous)
        lines.append(f"| mopd: step waited for rollout | - | {ms['wait_rollout']:.4f} |")
    lines.append(f"| teacher | {ts['teacher']:.4f} | {ms['teacher']:.4f} |")
    if "wait_teacher" in ms:
        lines.append(f"| mopd: step waited for teacher | - | {ms['wait_teacher']:.4f} |")
    lines.append(f"| old_log_prob | - | {ms['old_log_prob']:.4f} |")
    lines.append(f"| train (+ TRL's other) | {ts['train+other']:.4f} | {ms['train']:.4f} |")
    lines.append(f"| sync | - | {ms['sync']:.4f} |")
    lines.append(f"| other | - | {ms['other']:.4f} |")
    lines.append(f"| step (mopd: after step 1, which took {ms['first_step']:.2f} s) | "
                 f"{sum(ts.values()):.4f} | {ms['step']:.4f} |")
    return "\n".join(lines)


def curve_lines(curves: dict[str, list[dict]]) -> str:
    sides = [x for x in SIDES if x in curves]
    out = ["step: reverse KL / seq (training wall s), " + " | ".join(SIDE_LABELS[x] for x in sides)]
    at = {side: {p["step"]: p for p in curves[side]} for side in sides}
    for step in sorted(set().union(*at.values())):
        cells = [f"{p['seq_kl']:.3f} ({p['wall_s']:.1f})" if (p := at[side].get(step)) else "-" for side in sides]
        out.append(f"  {step:>5}: " + " | ".join(cells))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- driver
def _side(name: str, plan_path: Path, log_path: Path, ray_niceness: int | None = None) -> dict[str, Any]:
    """Run one side in a fresh interpreter (its own memory), its output into `log_path`."""
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "2")
    if ray_niceness is not None:
        env["RAY_worker_niceness"] = str(ray_niceness)
    out = WORK / f"{name}.json"
    out.unlink(missing_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with open(log_path, "w") as log:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "peer_trl.py"), "--side", name, "--plan", str(plan_path)]
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0 or not out.is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{name} side failed (exit {rc}); last lines of {log_path}:\n{tail}")
    print(f"{name}: done in {time.perf_counter() - t0:.0f} s (log: {log_path}); 1-min load average {load0:.1f} "
          f"at start, {os.getloadavg()[0]:.1f} at end on {os.cpu_count()} CPUs", flush=True)
    return json.loads(out.read_text())


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags (a `--preset`'s values as defaults that explicit flags override) and mopd's key=value overrides."""
    p = argparse.ArgumentParser(prog="benchmarks/peer_trl.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--mopd-steps", type=int, default=None,
                   help="steps mopd runs (default 2 x --steps): the first --steps equal TRL's, the rest show when "
                        "mopd reaches TRL's final KL (constant lr, so they do not change the first --steps)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (one sample each)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds (e.g. 0,1,2,3,4,5): run the whole comparison once per seed (data order "
                        "and sampling both follow the seed) and report each side's mean and spread and the paired "
                        "mopd - TRL difference; at lr 3e-3 two runs of the *same* update diverge within ~15 steps, so "
                        "one seed says nothing about learning per step")
    p.add_argument("--eval-every", type=int, default=25, help="checkpoint (and score) both sides every N steps")
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=4, help="sampled continuations per eval prompt")
    p.add_argument("--teacher-backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--threads", type=int, default=2, help="torch threads of TRL's process, mopd's trainer, scoring")
    p.add_argument("--ray-niceness", type=int, default=None,
                   help="RAY_worker_niceness for mopd's actors (default: Ray's own, 15; TRL runs at this shell's)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="long: 272 new tokens on the long-reasoning world's swap domain with a 13.4M-parameter MoE "
                        "student, 30 steps, mopd at k=0 and k=1 (flags given explicitly still win)")
    p.add_argument("--task", choices=sorted(TASKS), default="add", help="the world and domain to distil on")
    p.add_argument("--mopd-k1", action="store_true",
                   help="also run mopd one-step-off (trainer.max_staleness=1) and report its throughput")
    p.add_argument("--side", choices=["trl", "mopd", "mopd_k1"], help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (mopd overrides are key=value)")
    args.mopd_steps = args.mopd_steps or 2 * args.steps
    if args.mopd_steps < args.steps:
        p.error(f"--mopd-steps {args.mopd_steps} < --steps {args.steps}: mopd must run at least TRL's steps")
    return args, overrides


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    os.chdir(ROOT)

    if args.side:  # a subprocess: run one side and write its result
        plan = json.loads(Path(args.plan).read_text())
        out = WORK / args.side
        out.mkdir(parents=True, exist_ok=True)
        if args.side == "trl":
            res = run_trl(plan, out)
        elif args.side == "mopd":
            res = run_mopd(plan, out)
        else:
            res = run_mopd(plan, out, ["trainer.max_staleness=1", f"logging.run_dir={WORK / 'mopd_k1'}"])
        (WORK / f"{args.side}.json").write_text(json.dumps(res, indent=1))
        return

    if args.seeds:
        rows = []
        for seed in [int(x) for x in args.seeds.split(",")]:
            args.seed = seed
            print(f"\n=== seed {seed}", flush=True)
            rows.append(one_comparison(args, overrides))
            keep = WORK / "seeds" / f"seed_{seed}"
            keep.mkdir(parents=True, exist_ok=True)
            for f in ("curves.json", "trl.json", "mopd.json", "mopd_k1.json", "trl.log", "mopd.log", "mopd_k1.log"):
                if (WORK / f).is_file():
                    shutil.copy(WORK / f, keep / f)
        print()
        print(seed_table(rows))
        return
    one_comparison(args, overrides)


def seed_summary(plan: dict[str, Any], results: dict[str, dict], curves: dict[str, list[dict]]) -> dict[str, Any]:
    """One seed's figures for the spread tables, per side that ran: eval KL per sequence at the checkpoints of
    a third, two thirds and all of `--steps` (100 / 200 / 300 by default) and averaged over the last five
    checkpoints up to `--steps`, the mean on-policy training KL per token over the equal steps, and the training
    wall to reach TRL's final KL (over all of a side's steps) as a multiple of TRL's."""
    n = plan["steps"]
    marks = [round(n * f / 3) for f in (1, 2, 3)]
    target = next(p for p in curves["trl"] if p["step"] == n)["seq_kl"]
    trl_wall = _reach(curves["trl"], target)
    out: dict[str, Any] = {"seed": plan["seed"], "marks": marks}
    for side in [x for x in SIDES if x in curves]:
        at = {p["step"]: p["seq_kl"] for p in curves[side]}
        pts = [p for p in curves[side] if 0 < p["step"] <= n]
        out[f"{side}_kl"] = pts[-1]["seq_kl"]
        for m in marks:
            out[f"{side}_kl@{m}"] = at.get(m, float("nan"))
        out[f"{side}_kl_last5"] = statistics.mean(p["seq_kl"] for p in pts[-5:])
        out[f"{side}_train_kl"] = statistics.mean(results[side]["train_kl"][:n])
        reach = _reach(curves[side], target)
        out[f"{side}_reach_x"] = float("nan") if reach is None or not trl_wall else reach / trl_wall
        out[f"{side}_wall_x"] = results[side]["wall_s"] / results["trl"]["wall_s"]
    return out


def _spread(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]  # NaN: not reached / not checkpointed
    return "-" if not xs else f"{statistics.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def seed_table(rows: list[dict[str, Any]]) -> str:
    sides = [x for x in SIDES if f"{x}_kl" in rows[0]]
    cols = [("kl", "reverse KL / seq at the last step"), ("kl_last5", "same, mean of the last 5 checkpoints"),
            ("train_kl", "on-policy training KL / token, mean over the steps")]
    lines = ["| seed | " + " | ".join(f"{c[1]}: TRL / mopd" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {int(r['seed'])} | " + " | ".join(f"{r['trl_' + k]:.3f} / {r['mopd_' + k]:.3f}"
                                                           for k, _ in cols) + " |")
    if len(rows) > 1:
        for k, name in cols:
            a, b = [r["trl_" + k] for r in rows], [r["mopd_" + k] for r in rows]
            d = [y - x for x, y in zip(a, b, strict=True)]
            se = statistics.stdev(d) / len(d) ** 0.5
            lines.append(f"\n{name}: TRL {statistics.mean(a):.3f} (sd {statistics.stdev(a):.3f}), mopd "
                         f"{statistics.mean(b):.3f} (sd {statistics.stdev(b):.3f}); mopd - TRL {statistics.mean(d):+.3f} "
                         f"+- {se:.3f} (standard error of the paired mean, {len(d)} seeds)")
    # Each side's mean [min, max] over the seeds: the KL at the checkpoints, and the time ratios.
    marks = rows[0]["marks"]
    keys = [(f"kl@{m}", f"reverse KL / seq, step {m}") for m in marks] + [
        ("reach_x", "training wall to TRL's final KL, x TRL's"), ("wall_x", f"training wall, {marks[-1]} steps, x TRL's")]
    lines += ["", f"{len(rows)} seeds, mean [min, max]:", "", "| | " + " | ".join(SIDE_LABELS[x] for x in sides) + " |",
              "|---" * (len(sides) + 1) + "|"]
    for k, name in keys:
        lines.append(f"| {name} | " + " | ".join(_spread([r[f"{x}_{k}"] for r in rows]) for x in sides) + " |")
    for x in sides[1:]:
        inside = []
        for m in marks:
            trl = [r[f"trl_kl@{m}"] for r in rows]
            mean = statistics.mean(r[f"{x}_kl@{m}"] for r in rows)
            inside.append(f"step {m} {'inside' if min(trl) <= mean <= max(trl) else 'outside'}")
        lines.append(f"\n{SIDE_LABELS[x]}'s mean KL against TRL's range: " + ", ".join(inside))
    return "\n".join(lines)


def one_comparison(args: argparse.Namespace, overrides: list[str]) -> dict[str, float]:
    t0 = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args, overrides)
    plan_path = WORK / "plan.json"
    plan_path.write_text(json.dumps(plan))
    digest = hashlib.sha256(json.dumps([s["ids"] for s in plan["step_prompts"]]).encode()).hexdigest()[:12]
    print(f"plan: task {plan['task']}, {plan['steps']} steps x {plan['prompts']} prompts, {plan['max_new_tokens']} new tokens, "
          f"lr {plan['lr']:g}, temperature {plan['temperature']:g}, mopd teacher backend {plan['teacher_backend']}, "
          f"{plan['threads']} torch threads, niceness TRL {os.nice(0)} / mopd actors "
          f"{args.ray_niceness if args.ray_niceness is not None else os.environ.get('RAY_worker_niceness', 15)}; "
          f"prompt ids digest {digest}",
          flush=True)
    results = {"trl": _side("trl", plan_path, WORK / "trl.log"),
               "mopd": _side("mopd", plan_path, WORK / "mopd.log", args.ray_niceness)}
    if args.mopd_k1:
        results["mopd_k1"] = _side("mopd_k1", plan_path, WORK / "mopd_k1.log", args.ray_niceness)
    print(f"scoring {len(results['trl']['points']) + len(results['mopd']['points']) + 1} models on "
          f"{len(plan['eval_ids'])} eval prompts x {args.eval_samples} samples", flush=True)
    curves = score(plan, results, args)
    (WORK / "curves.json").write_text(json.dumps(curves, indent=1))
    print()
    print(report(plan, results, curves))
    print()
    print(length_table(plan, results))
    print()
    print(stage_table(results))
    print()
    print(curve_lines(curves))
    print(f"\nwhole benchmark: {time.perf_counter() - t0:.0f} s; results in {WORK}/")
    return seed_summary(plan, results, curves)


if __name__ == "__main__":
    main(sys.argv[1:])
