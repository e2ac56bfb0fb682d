"""A few real MOPD steps through Ray actors (vLLM rollout, vLLM teachers, optimizer step, weight sync),
and kill-then-resume of a real `mopd train` process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_loggers import _tb_scalars

from mopd.config import load_config
from mopd.data import AutoMix, DomainMixSampler, load_rows
from mopd.jsonl import read_metrics
from mopd.train import rows_digest, train

pytestmark = pytest.mark.slow


def world_overrides(world: dict) -> list[str]:
    """The tiny world's own config as overrides, so `train` finds it cached instead of rebuilding."""
    over = [f"world.{k}={json.dumps(v)}" for k, v in world["config"].items() if k != "dir"]
    # The synchronous loop unless a test asks for the pipeline (the quickstart runs one-step-off): its
    # assertions (pi_old == mu after every sync) are the synchronous loop's.
    return [f"world.dir={world['dir']}", *over, "data.eval_size_per_domain=16", "logging.progress_bar=false",
            "rollout.max_tokens=12", "trainer.prompts_per_step=8", "trainer.eval_every=0", "trainer.max_staleness=0"]


def test_mopd_steps_lower_teacher_kl_and_engines_track_trainer(tiny_world, ray_local, tmp_path):
    # The routers and layer 0's experts frozen: every sync sends the other tensors only, and the engine
    # re-prepares only the expert layers it received (the pi_old == mu check below holds the engine to it).
    frozen = ["*.mlp.gate.weight", "model.layers.0.mlp.experts.*"]
    cfg = load_config("configs/quickstart.yaml", world_overrides(tiny_world) + [
        f"logging.run_dir={tmp_path}/run", "trainer.steps=6", "trainer.lr=5e-3",
        "algorithm.objective=reverse_kl", "algorithm.teacher_top_k=-1", f"trainer.freeze={json.dumps(frozen)}",
        "logging.sinks=[jsonl,tensorboard]"])
    lines: list[str] = []
    result = train(cfg, log=lines.append)
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "actor/grad_norm" in m]
    assert [m["step"] for m in steps] == list(range(1, 7))
    # The default weight sync: a gloo broadcast from trainer rank 0 (no fallback to the object store).
    assert any(line.endswith("weight sync: collective") for line in lines), lines
    # After every sync the engine samples with the trainer's weights: pi_old == mu up to fp32 noise.
    for m in steps:
        assert m["training/rollout_probs_diff_max"] < 1e-3, m
        assert m["icepop/masked_frac"] == 0.0
        assert m["rollout/staleness_max"] == 0  # trainer.max_staleness=0: the synchronous loop
    first, last = steps[0], steps[-1]
    assert last["mopd/teacher_kl"] < first["mopd/teacher_kl"]
    before = sum(v["teacher_kl"] for v in result["before"].values())
    after = sum(v["teacher_kl"] for v in result["after"].values())
    assert after < before
    for key in ["timing_s/rollout", "timing_s/teacher", "timing_s/train", "timing_s/sync", "timing_s/old_log_prob", "timing_s/other", "actor/loss", "mopd/teacher_kl/add",
                "rollout_corr/k3_kl", "rollout_corr/rollout_is_eff_sample_size", "actor/entropy", "reward/rev/acc"]:
        assert key in last
    # The TensorBoard sink beside the JSONL one writes the same curve, evaluations included.
    tb = _tb_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in tb["mopd/teacher_kl"]] == list(range(1, 7))
    for (step, value), m in zip(tb["mopd/teacher_kl"], steps, strict=True):
        assert math.isclose(value, m["mopd/teacher_kl"], rel_tol=1e-6, abs_tol=1e-6), step
    assert "timing_s/step" in tb and "eval/add/acc" in tb
    for key in ["perf/mem_gb/trainer", "perf/mem_gb/student[0]", "perf/mem_gb/teacher:add_teacher[0]",
                "perf/mem_gb/total", "perf/pss_gb/total"]:  # memory of every process, on the first step
        assert steps[0][key] > 0, key
    assert (tmp_path / "run" / "result.md").read_text().count("|") > 10
    # Frozen parameters are those of the initial student; the trained ones moved.
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    start, end = weights(Path(tiny_world["dir"]) / "student"), weights(tmp_path / "run" / "checkpoints" / "step_6" / "model")
    routers = [k for k in end if k.endswith(".mlp.gate.weight")]
    assert routers and all(end[k].equal(start[k]) for k in routers)
    assert not end["model.layers.1.self_attn.q_proj.weight"].equal(start["model.layers.1.self_attn.q_proj.weight"])


def test_killed_run_resumes_with_same_data_order(tiny_world, ray_local, tmp_path):
    """The one-step-off pipeline (the synchronous loop's resume: the second-train test below)."""
    run = tmp_path / "run"
    # With the pipeline, the domain mix follows the logged teacher KL too (data.auto_mix): resume must replay it.
    over = world_overrides(tiny_world) + [f"logging.run_dir={run}", "trainer.save_every=2", "ray.num_cpus=2",
                                          "trainer.max_staleness=1", "data.auto_mix.enabled=true"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mopd.cli", "train", "configs/quickstart.yaml",
                             *over, "trainer.steps=40"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (run / "checkpoints" / "step_2" / "state.json").exists():
            assert proc.poll() is None, "training process died before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(m["step"] for m in read_metrics(run / "metrics.jsonl"))
    assert killed_at >= 2
    # Steps are fast here (a pipelined run may pass step 6 before the kill lands): resume to 3 past the
    # checkpoint, whatever it is, and past every step the killed run logged.
    ck = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    last = max(ck, killed_at) + 3
    cfg = load_config("configs/quickstart.yaml", over + [f"trainer.steps={last}"])
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # the killed run's lock file is left...
    log: list[str] = []
    train(cfg, resume=True, log=log.append)
    took = [ln for ln in log if "took over the lock left by" in ln]  # ...and taken over, said in the log
    assert len(took) == 1 and f"pid {proc.pid} " in took[0], log
    assert not (run / ".lock").exists()  # a finished run gives its dir back
    metrics = [m for m in read_metrics(run / "metrics.jsonl") if "data/batch_digest" in m]
    assert [m["step"] for m in metrics] == list(range(1, last + 1))  # each step once: lines past the checkpoint dropped
    rows = load_rows(cfg.data.train_files)
    sampler = DomainMixSampler(rows, cfg.data.domain_mix, cfg.trainer.seed)
    auto = AutoMix(sampler.domains, sampler.weights, cfg.data.auto_mix.ema, cfg.data.auto_mix.floor, 1)
    expected = []
    for m in metrics:  # batch s: a function of the seed, s and the teacher KL logged up to s - 1 - k
        w = auto.weights_for(m["step"])
        expected.append(rows_digest([rows[i]["id"] for i in sampler.batch(m["step"] - 1, cfg.trainer.prompts_per_step, w)]))
        auto.observe(m["step"], m)
    assert [m["data/rows_digest"] for m in metrics] == expected
    assert any(abs(m["data/mix/add"] - sampler.weights[0]) > 0.01 for m in metrics)
    assert Path(run / "checkpoints" / "latest").read_text().strip() == f"step_{last}"


def test_a_second_train_into_a_running_runs_dir_is_refused_and_the_first_is_intact(tiny_world, ray_local, tmp_path,
                                                                                   capsys):
    """Two real `mopd train` into one run dir: the second (here, through the CLI in this process) is refused at
    once naming the first (pid, host, since), with or without --overwrite / --resume; the first keeps running,
    stops cleanly on SIGTERM with its last finished step saved, and has every step once; resumed, the synchronous
    loop draws the batches an unstopped run would (the pipeline's exact resume: tests/test_resume_exact_slow.py)."""
    import socket

    from mopd.cli import main

    run = tmp_path / "run"
    over = world_overrides(tiny_world) + [f"logging.run_dir={run}", "trainer.save_every=3", "ray.num_cpus=2"]
    proc = subprocess.Popen([sys.executable, "-m", "mopd.cli", "train", "configs/quickstart.yaml", *over,
                             "trainer.steps=200"], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True)
    try:
        _wait_for_checkpoint(proc, run / "checkpoints" / "step_3")
        before = read_metrics(run / "metrics.jsonl")
        for flags in ([], ["--overwrite"], ["--resume"]):
            code = main(["train", "configs/quickstart.yaml", *over, "trainer.steps=5", *flags])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1, err
            assert err.startswith(f"mopd: error: run dir {run} is in use by pid {proc.pid} on host "
                                  f"{socket.gethostname()}, since "), err
            assert "Wait for it to finish or stop it" in err and "choose another logging.run_dir" in err, err
        assert proc.poll() is None, "the first run stopped"
        after = read_metrics(run / "metrics.jsonl")
        assert after[:len(before)] == before  # nothing of the first run was deleted or rewritten
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err  # SIGTERM (a preempting scheduler) is a clean stop that says how to go on
    assert "SIGTERM" in err and "--resume" in err, err
    steps = [m["step"] for m in read_metrics(run / "metrics.jsonl") if "data/batch_digest" in m]
    assert steps == list(range(1, max(steps) + 1)) and max(steps) >= 3  # nothing finished is lost
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{max(steps)}"
    assert not (run / ".lock").exists()  # released at its exit
    last = max(steps)
    cfg = load_config("configs/quickstart.yaml", over + [f"trainer.steps={last + 2}"])
    train(cfg, resume=True, log=lambda *_: None)
    metrics = [m for m in read_metrics(run / "metrics.jsonl") if "data/batch_digest" in m]
    assert [m["step"] for m in metrics] == list(range(1, last + 3))
    rows = load_rows(cfg.data.train_files)
    sampler = DomainMixSampler(rows, cfg.data.domain_mix, cfg.trainer.seed)
    assert [m["data/rows_digest"] for m in metrics] == [
        rows_digest([rows[i]["id"] for i in sampler.batch(m["step"] - 1, cfg.trainer.prompts_per_step)]) for m in metrics]


def _wait_for_checkpoint(proc: subprocess.Popen, ck: Path, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not (ck / "state.json").exists():
        assert proc.poll() is None, "training process died before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.5)
