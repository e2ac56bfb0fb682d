"""The bounded-staleness pipeline (`trainer.max_staleness`): the launch rule bounds every sample's staleness,
k = 0 is the synchronous loop, and k = 1 overlaps rollout and scoring with training on real engines."""

from __future__ import annotations

import random

import pytest
from test_train_loop import world_overrides

from mopd.config import load_config
from mopd.data import DomainMixSampler, load_rows
from mopd.jsonl import read_metrics
from mopd.producer import may_launch, rows_digest
from mopd.train import train


def simulate(k: int, steps: int, rng: random.Random) -> dict[int, int]:
    """A discrete-event model of the pipeline against one engine that serves its requests in submission
    order (as a Ray actor does for one caller): the producer submits rollout j when `may_launch` allows,
    the step loop trains step s once batch s is back and then submits the update to version s. Random
    durations for rollout, update and training. Returns each step's staleness (s - 1 - sampling version)."""
    queue: list[tuple[str, int]] = []  # the engine's pending requests, in submission order
    engine_free_at, engine_version = 0.0, 0
    sampled: dict[int, int] = {}  # batch -> version it was sampled with
    done_at: dict[int, float] = {}
    synced, next_launch, now = 0, 1, 0.0
    for s in range(1, steps + 1):
        # The producer submits every rollout the rule allows, in order.
        while next_launch <= steps and may_launch(next_launch, synced, k):
            queue.append(("gen", next_launch))
            next_launch += 1
        # The engine works through its queue until batch s is back.
        while s not in done_at:
            kind, x = queue.pop(0)
            start = max(engine_free_at, now if kind == "upd" else 0.0)
            if kind == "gen":
                sampled[x] = engine_version
                engine_free_at = done_at[x] = start + rng.uniform(0.1, 2.0)
            else:
                engine_version = x
                engine_free_at = start + rng.uniform(0.01, 0.5)
            # New rollouts may become allowed only by updates, submitted by the loop below.
        now = max(now, done_at[s]) + rng.uniform(0.1, 2.0)  # train step s
        queue.append(("upd", s))
        synced = s
    return {s: s - 1 - v for s, v in sampled.items()}


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_staleness_never_exceeds_the_bound(k):
    rng = random.Random(k)
    seen = set()
    for _ in range(200):
        lag = simulate(k, 12, rng)
        assert all(0 <= v <= k for v in lag.values()), lag
        seen |= set(lag.values())
    assert seen == set(range(k + 1))  # the bound is reached: the pipeline really runs ahead


def test_the_rule():
    assert may_launch(1, 0, 0) and not may_launch(2, 0, 0)  # synchronous: batch 2 waits for version 1
    assert may_launch(2, 0, 1) and not may_launch(3, 0, 1)  # one-step-off
    assert may_launch(5, 2, 2) and not may_launch(6, 2, 2)


def test_max_staleness_is_validated():
    from mopd.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.max_staleness"):
        load_config("configs/quickstart.yaml", ["trainer.max_staleness=-1"])


def _run(tiny_world, tmp_path, k):
    cfg = load_config("configs/quickstart.yaml", world_overrides(tiny_world) + [
        f"logging.run_dir={tmp_path}/k{k}", "trainer.steps=5", "trainer.lr=5e-3", "trainer.warmup_steps=0",
        f"trainer.max_staleness={k}",
        "algorithm.objective=reverse_kl", "algorithm.teacher_top_k=-1"])
    lines: list[str] = []
    train(cfg, log=lines.append)
    assert any(line.endswith("weight sync: collective") for line in lines), lines  # rank 0 broadcasts
    return cfg, [m for m in read_metrics(tmp_path / f"k{k}" / "metrics.jsonl") if "actor/grad_norm" in m]


def test_one_step_off_overlaps_and_corrects_with_the_sampling_policy(tiny_world, ray_local, tmp_path):
    """k = 1 on real engines (the synchronous loop, k = 0, is test_train_loop's: staleness 0, pi_old == mu)."""
    cfg, async1 = _run(tiny_world, tmp_path, 1)
    rows = load_rows(cfg.data.train_files)
    sampler = DomainMixSampler(rows, cfg.data.domain_mix, cfg.trainer.seed)
    expected = [rows_digest([rows[i]["id"] for i in sampler.batch(s, cfg.trainer.prompts_per_step)]) for s in range(5)]
    # The same prompts at every step as the synchronous loop: batches are a function of (seed, step).
    assert [m["step"] for m in async1] == [1, 2, 3, 4, 5]
    assert [m["data/rows_digest"] for m in async1] == expected
    # Never more than one step stale, and stale after the first step (the rollout ran during training).
    assert all(m["rollout/staleness_max"] <= 1 for m in async1)
    first = async1[0]  # batch 1 is drawn by the initial weights, which train on it: the synchronous case
    assert first["rollout/staleness_max"] == 0 and first["training/rollout_probs_diff_max"] < 1e-3
    stale = [m for m in async1 if m["rollout/staleness_max"] == 1]
    assert len(stale) >= 3
    # The correction compares pi_old with the engine's mu of the policy that sampled: they differ on stale
    # batches (the trainer moved on), and IcePop/TIS weights move away from 1.
    for m in stale:
        assert m["training/rollout_probs_diff_max"] > 1e-3
        assert m["rollout_corr/rollout_is_mean"] != pytest.approx(1.0, abs=1e-6)
    for key in ("timing_s/wait_rollout", "timing_s/wait_teacher", "timing_s/rollout", "timing_s/teacher"):
        assert key in first
