"""Teacher pools (teachers/pool.py): config and architecture refusals, LRU scheduling and accounting (fast);
pooled scoring against dedicated engines after arbitrary swap orders, and the identity check (slow: engines)."""

from __future__ import annotations

import gc
import random

import pytest
from tiny_models import save_tiny_models

from mopd.config import ConfigError, load_config
from mopd.placement import plan_bundles, teacher_roles
from mopd.world.models import build_teacher, save_model
from mopd.world.tokenizer import build_tokenizer
from teachers.accounting import scoring_order, teacher_metrics, teacher_staleness
from teachers.pool import (
    PooledTeacherHandle,
    TeacherIdentityError,
    TeacherPool,
    architecture_mismatch,
    read_weights,
    weight_items,
)
from teachers.preflight import ModelCheckError, check_model_folders

POOLED = ["teacher_pools.dense.engines=1", "teachers.add_teacher.pool=dense", "teachers.rev_teacher.pool=dense",
          "teachers.sort_teacher.pool=dense"]


@pytest.fixture(scope="module")
def three_teachers(tmp_path_factory):
    """Three tiny dense teachers of one architecture with different weights, and the tiny MoE student."""
    d = tmp_path_factory.mktemp("pool")
    tok = save_tiny_models(d)
    for i, name in enumerate(["a", "b", "c"]):
        save_model(build_teacher(tok, seed=10 + i), tok, d / name)
    return d


def test_pool_config_keys_and_plan():
    cfg = load_config("configs/quickstart.yaml", POOLED)
    assert teacher_roles(cfg)["teacher_pool:dense"] == ["add_teacher", "rev_teacher", "sort_teacher"]
    plan = plan_bundles(cfg)
    assert len(plan.roles["teacher_pool:dense"]) == 1  # one engine's bundle for three teachers
    assert not any(r.startswith("teacher:") for r in plan.roles)


@pytest.mark.parametrize("over, key", [
    (["teachers.add_teacher.pool=nope"], "teachers.add_teacher.pool"),
    ([*POOLED, "teacher_pools.dense.engines=4"], "teacher_pools.dense.engines"),
    ([*POOLED, "teacher_pools.spare.engines=1"], "teacher_pools.spare"),
    ([*POOLED, "teachers.add_teacher.replicas=2"], "teachers.add_teacher.pool"),
    ([*POOLED, "teachers.add_teacher.backend=hf"], "teachers.add_teacher.pool"),
    ([*POOLED, "teachers.add_teacher.dtype=bfloat16"], "teacher_pools.dense"),
    ([*POOLED, "teacher_pools.dense.policy=fifo"], "teacher_pools.dense.policy"),
])
def test_bad_pool_configs_are_refused_naming_the_key(over, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("configs/quickstart.yaml", over)


def test_a_pool_mixing_architectures_is_refused_before_any_engine(three_teachers):
    d = three_teachers
    assert architecture_mismatch({"a": str(d / "a"), "b": str(d / "b"), "c": str(d / "c")}) is None
    problem = architecture_mismatch({"a": str(d / "a"), "moe": str(d / "student")})
    assert problem is not None and "teacher 'moe' differs from 'a'" in problem and "model_type" in problem
    cfg = load_config("configs/quickstart.yaml", [
        *POOLED, f"student.path={d}/student", f"teachers.add_teacher.path={d}/a",
        f"teachers.rev_teacher.path={d}/b", f"teachers.sort_teacher.path={d}/student"])
    with pytest.raises(ModelCheckError, match="teacher_pools.dense mixes architectures: teacher 'sort_teacher'"):
        check_model_folders(cfg, weights=False)


def test_lru_scheduling_residents_first_and_the_least_recently_used_engine_swaps():
    pool = TeacherPool("p", engines=[None, None], resident=["a", "b"], teachers=["a", "b", "c", "d"])
    assert pool.order(["c", "b", "d", "a"]) == ["b", "a", "c", "d"]
    picks = [pool.pick(t) for t in ["a", "b", "c", "a", "d", "b"]]
    # c evicts a (least recently used), a comes back over b, d over c, b over a.
    assert picks == [(0, False), (1, False), (0, True), (1, True), (0, True), (1, True)]
    assert pool.resident == ["d", "b"]
    teachers = {"x": ["dedicated"], **{n: [PooledTeacherHandle(pool, n)] for n in pool.teachers}}
    assert scoring_order(teachers, ["c", "x", "b", "d"]) == ["x", "b", "d", "c"]
    m = teacher_metrics({"b": {"score_s": 0.5, "swaps": 1.0, "swap_s": 0.02}, "x": {"score_s": 0.25}},
                        {"b": 30, "x": 10}, teachers)
    assert m["teacher/b/token_share"] == 0.75 and m["teacher/x/tokens"] == 10
    assert m["timing_s/teacher/b"] == 0.5 and m["pool/swaps"] == 1 and m["timing_s/pool_swap"] == 0.02
    assert m["pool/p/resident/d"] == 1 and m["pool/p/resident/a"] == 0
    assert m["pool/p/swaps"] == 1 and "pool/p/hit_rate" not in m  # no call counts: no hit rate


def test_pool_hit_rate_and_per_teacher_staleness():
    """The LRU hit rate counts the pool's calls that found their teacher resident; a teacher's staleness is the
    policy-version lag of the samples it scored (the per-teacher `rollout/staleness_mean`)."""
    pool = TeacherPool("p", engines=[None], resident=["a"], teachers=["a", "b"])
    teachers = {n: [PooledTeacherHandle(pool, n)] for n in pool.teachers}
    stats: dict = {}
    from teachers.accounting import add_stats, call_stats

    class Answer(list):
        score_s, swapped, swap_s = 0.1, False, 0.0

    hit, miss = Answer(), Answer()
    miss.swapped, miss.swap_s = True, 0.05
    for name, ans in [("a", hit), ("a", hit), ("b", miss), ("a", miss)]:
        add_stats(stats, name, call_stats(ans))
    m = teacher_metrics(stats, {"a": 6, "b": 2}, teachers)
    assert m["pool/p/hit_rate"] == pytest.approx(0.5) and m["pool/p/swaps"] == 2 == m["pool/swaps"]
    assert m["timing_s/pool_swap"] == pytest.approx(0.1)
    got = teacher_staleness([("a", 0), ("a", 1), ("b", 1), (None, 5), ("b", 1), ("a", 2)])
    assert got == {"teacher/a/staleness_mean": 1.0, "teacher/b/staleness_mean": 1.0}
    assert teacher_staleness([]) == {}


def test_dashboard_draws_teacher_staleness_pool_hit_rate_and_residency(tmp_path):
    """The per-teacher and pool records get panels beside the teacher token share (one residency panel per
    pool), and a run without a pool draws none of the pool's."""
    from test_dashboard import healthy_rows, write_run

    from stability.dashboard import dashboard_figures, load_runs

    rows = healthy_rows(6)
    for r in rows:
        if "actor/grad_norm" in r:
            r.update({"teacher/add_t/staleness_mean": 1.0, "teacher/rev_t/staleness_mean": 0.0,
                      "pool/dense/hit_rate": 0.5, "pool/swaps": 1.0, "pool/dense/resident/add_t": 1.0,
                      "pool/dense/resident/rev_t": 0.0})
    panels, _ = dashboard_figures(load_runs([write_run(tmp_path / "pooled", rows)]))
    by = {p.title: p for p in panels}
    assert sorted(by["Teacher sample staleness (policy versions)"].metrics) == [
        "teacher/add_t/staleness_mean", "teacher/rev_t/staleness_mean"]
    assert by["Teacher pool hit rate (no swap)"].metrics == ["pool/dense/hit_rate"]
    assert sorted(by["Teacher pool residency · dense"].metrics) == [
        "pool/dense/resident/add_t", "pool/dense/resident/rev_t"]
    assert all(p.figure.data for p in by.values() if p.title.startswith(("Teacher pool", "Teacher sample")))
    plain, _ = dashboard_figures(load_runs([write_run(tmp_path / "plain", healthy_rows(6))]))
    assert not [p.title for p in plain if p.title.startswith(("Teacher pool", "Teacher sample"))]


def test_weights_round_trip_bit_exact(three_teachers):
    import torch
    from safetensors.torch import load_file

    store = read_weights(str(three_teachers / "a"))
    ref = load_file(str(three_teachers / "a" / "model.safetensors"))
    got = dict(weight_items(store))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    bf16 = {k: v.to(torch.bfloat16) for k, v in ref.items()}
    from teachers import pool as pool_mod

    packed = {f"{k}|bfloat16": v.view(torch.int16).numpy() for k, v in bf16.items()}
    assert all(torch.equal(t, bf16[k]) and t.dtype == torch.bfloat16 for k, t in pool_mod.weight_items(packed))


@pytest.mark.slow
def test_pooled_scoring_equals_dedicated_engines_after_any_swap_order(three_teachers):
    """One pooled engine becoming a, b, c in a random order scores exactly as each teacher's own engine; a
    request naming a teacher the engine does not hold is refused."""
    from teachers.pool import PooledTeacherEngine
    from teachers.vllm_teacher import TeacherEngine

    d, names = three_teachers, ["a", "b", "c"]
    tok = build_tokenizer()
    seqs = [tok.encode(t) for t in ["12+34=46", "abc>cba", "dcba>abcd", "7+8=15"]]
    plens = [3, 4, 5, 2]
    kw = dict(max_model_len=32, kv_cache_gb=0.02, max_top_k=4)
    dedicated = {}
    for n in names:
        e = TeacherEngine(str(d / n), **kw)
        dedicated[n] = e.score(seqs, plens, 4)
        del e
        gc.collect()
    pooled = PooledTeacherEngine(str(d / "a"), teacher="a", weights={n: read_weights(str(d / n)) for n in names}, **kw)
    order = random.Random(0).choices(names, k=7) + ["a", "c", "b"]
    for n in order:
        info = pooled.load_teacher(n)
        got = pooled.score(seqs, plens, 4, teacher=n)
        for g, r in zip(got, dedicated[n], strict=True):
            assert g.logprobs == pytest.approx(r.logprobs, abs=1e-6, rel=0)
            assert (g.topk_ids == r.topk_ids).all()
        assert got.swapped == info["swapped"]
    assert pooled.swaps >= 5
    other = next(n for n in names if n != pooled.resident())
    with pytest.raises(TeacherIdentityError, match=f"holds teacher '{pooled.resident()}'.*as '{other}'"):
        pooled.score(seqs, plens, 4, teacher=other)
    with pytest.raises(TeacherIdentityError):
        pooled.score(seqs, plens, 4)  # a pooled engine scores only for a named teacher
    # The teachers really differ: scoring with the wrong weights would have been caught by the comparison above.
    assert dedicated["a"][0].logprobs != pytest.approx(dedicated["b"][0].logprobs, abs=1e-3)


def test_a_run_on_a_pool_of_two_engines_for_three_teachers(tiny_world, ray_local, tmp_path):
    """Three teachers on two pooled engine actors through the real loop: every step scores all three, so one
    of them swaps in, and the step record accounts for each teacher and the swaps."""
    from test_train_loop import world_overrides

    from mopd.jsonl import read_metrics
    from mopd.train import train

    cfg = load_config("configs/quickstart.yaml", world_overrides(tiny_world) + [
        *POOLED, "teacher_pools.dense.engines=2", f"logging.run_dir={tmp_path}/run", "trainer.steps=3"])
    lines: list[str] = []
    train(cfg, log=lines.append)
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "actor/grad_norm" in m]
    assert len(steps) == 3
    for m in steps:
        names = sorted(k.split("/")[1] for k in m if k.startswith("teacher/") and k.endswith("/tokens"))
        assert names == ["add_teacher", "rev_teacher", "sort_teacher"], m
        assert sum(m[f"teacher/{n}/token_share"] for n in names) == pytest.approx(1.0)
        assert all(m[f"timing_s/teacher/{n}"] > 0 for n in names)
        assert m["pool/swaps"] >= 1 and m["timing_s/pool_swap"] > 0  # three teachers, two engines
        assert sum(m[f"pool/dense/resident/{n}"] for n in names) == 2
        assert m["pool/dense/swaps"] == m["pool/swaps"] and 0 <= m["pool/dense/hit_rate"] < 1
        assert all(m[f"teacher/{n}/staleness_mean"] == m["rollout/staleness_mean"] for n in names)  # one rollout
    assert steps[0]["perf/mem_gb/teacher_pool:dense[1]"] > 0
    assert not any(k.startswith("perf/mem_gb/teacher:") for k in steps[0])


def test_concurrent_scoring_through_one_pooled_engine_never_mixes_weights(three_teachers, ray_local):
    """Two threads score as different teachers through a one-engine pool at once, so every call needs a swap
    between two of the other thread's: each answer is still its own teacher's (the dedicated engine's)."""
    import threading

    from rollout.types import EngineSpec
    from teachers.backends import TeacherLaunch
    from teachers.pool import start_teacher_pool
    from teachers.vllm_teacher import TeacherEngine

    d, names = three_teachers, ["a", "b", "c"]
    tok = build_tokenizer()
    seqs, plens = [tok.encode("12+34=46"), tok.encode("dcba>abcd")], [3, 5]
    kw = dict(max_model_len=32, kv_cache_gb=0.02)
    dedicated = {}
    for n in names:
        e = TeacherEngine(str(d / n), max_top_k=2, **kw)
        dedicated[n] = [x for s in e.score(seqs, plens, 2) for x in s.logprobs]
        del e
        gc.collect()
    launches = [TeacherLaunch(n, None, EngineSpec(str(d / n), num_cpus=0.5, max_top_k=2, **kw)) for n in names]
    pool = start_teacher_pool("p", launches, engines=1)
    handles = {n: pool.handle(n) for n in names}
    got: dict[str, list] = {n: [] for n in names}

    def worker(order: list[str]) -> None:
        refs = [(n, handles[n].score.remote(seqs, plens, 2)) for n in order]
        for n, ref in refs:
            got[n].append([x for s in ray_local.get(ref) for x in s.logprobs])

    threads = [threading.Thread(target=worker, args=(o,)) for o in (["a", "b"] * 4, ["c", "a"] * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in names:
        assert got[n] and all(g == pytest.approx(dedicated[n], abs=1e-6, rel=0) for g in got[n]), n
    assert ray_local.get(pool.engines[0].ready.remote())["teacher"] in names
    assert ray_local.get(pool.engines[0].__ray_call__.remote(lambda self: self.swaps)) >= 4  # it really swapped
    ray_local.kill(pool.engines[0])
