"""`mopd compare` end to end on the tiny world (two runs at a few seconds each, one shared call), and the
SFT baseline's data: samples that each row's own teacher generated."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from test_train_loop import world_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.compare import compare
from mopd.data import encode_rows
from mopd.jsonl import read_metrics
from mopd.producer import teacher_rollout
from mopd.world.tasks import read_jsonl
from rollout.types import EngineSpec
from teachers.registry import TeacherRegistry
from teachers.vllm_teacher import start_teacher

pytestmark = pytest.mark.slow

DOMAINS = ("add", "rev", "sort")
RUNS = ("reverse_kl", "sft")
BUDGET_S = 3


def response_logprobs(model, prompt, response):
    with torch.no_grad():
        lp = model(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
    return torch.tensor([lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)])


def test_teacher_rollout_samples_come_from_each_rows_own_teacher(tiny_world, ray_local):
    d = tiny_world["dir"]
    tok = AutoTokenizer.from_pretrained(f"{d}/student")
    registry = TeacherRegistry()
    registry.register("add_teacher", ["add"], f"{d}/teachers/add")
    registry.register("rev_teacher", ["rev"], f"{d}/teachers/rev")
    train = read_jsonl(os.path.join(d, "data", "train.jsonl"))
    adds, revs = [r for r in train if r["domain"] == "add"], [r for r in train if r["domain"] == "rev"]
    rows = [revs[0], adds[0], revs[1], adds[1], adds[2]]  # interleaved: the output must still follow the rows
    ids = encode_rows(tok, rows, 32)
    kw = dict(max_model_len=64, dtype="float32", enforce_eager=True, num_cpus=0.25, num_gpus=0, omp_threads=1,
              kv_cache_gb=1, gpu_memory_utilization=0.3, seed=0)
    teachers = {name: start_teacher(EngineSpec(spec.path, **kw), replicas=1) for name, spec in registry.teachers.items()}
    try:
        out = teacher_rollout(teachers, registry, ids, rows, n=2, temperature=1.0, max_tokens=8, seed=3)
    finally:
        for reps in teachers.values():
            for a in reps:
                ray_local.kill(a)
    assert [s.group for s in out] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    hf = {name: AutoModelForCausalLM.from_pretrained(spec.path) for name, spec in registry.teachers.items()}
    off = []
    for s in out:
        row = rows[s.group]
        assert s.row is row and s.sample.prompt_ids == ids[s.group]
        own = registry.teacher_for(row["domain"])
        assert s.teacher == own == f"{row['domain']}_teacher"
        assert s.teacher_logprobs == [] and s.score is None  # not scored here: that is the caller's job
        r = s.sample.response_ids
        assert 1 <= len(r) <= 8 and len(s.sample.rollout_logprobs) == len(r)
        mu = torch.tensor(s.sample.rollout_logprobs)
        # The engine's log-prob of each sampled token is its own teacher's, not the other teacher's.
        assert (mu - response_logprobs(hf[own], s.sample.prompt_ids, r)).abs().max() < 1e-3
        other = next(n for n in hf if n != own)
        off.append((mu - response_logprobs(hf[other], s.sample.prompt_ids, r)).abs().max().item())
    assert max(off) > 0.1  # the two teachers do differ, so the match above singles out the generating one


@pytest.fixture(scope="module")
def compared(tiny_world, ray_local, tmp_path_factory):
    """One `compare` of two runs; a third run in the spec is left out with `only`."""
    out = tmp_path_factory.mktemp("compare")
    spec = out / "compare.yaml"
    spec.write_text(yaml.safe_dump({
        "base": "configs/quickstart.yaml", "budget_s": BUDGET_S, "out_dir": str(out / "runs"),
        "runs": {"reverse_kl": ["algorithm.objective=reverse_kl", "algorithm.teacher_top_k=-1"],
                 "sft": ["algorithm.objective=sft"],
                 "not_run": ["algorithm.objective=pg"]}}))
    lines: list[str] = []
    table = compare(str(spec), world_overrides(tiny_world), only=list(RUNS), log=lines.append)
    return out / "runs", table, lines


def test_compare_writes_one_table_per_domain_with_every_run(compared):
    runs, table, lines = compared
    assert (runs / "comparison.md").read_text() == table + "\n"
    sections = table.split("### ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == list(DOMAINS)
    for sec in sections:
        names = [line.split("|")[1].strip() for line in sec.splitlines() if line.startswith("|")]
        assert [n for n in names if n in RUNS + ("not_run",)] == list(RUNS)
    assert any(line.startswith("== reverse_kl") for line in lines) and any(line.startswith("== sft") for line in lines)
    assert not (runs / "not_run").exists()


def test_compare_json_holds_each_runs_result(compared):
    runs, _, _ = compared
    results = json.loads((runs / "comparison.json").read_text())
    assert list(results) == list(RUNS)
    for name, r in results.items():
        assert r["experiment"] == name and r["objective"] == name
        assert r["steps"] >= 1
        assert r["train_s"] >= BUDGET_S  # the loop stops only once the budget is spent
        for part in ("before", "after", "teacher"):
            assert set(r[part]) == set(DOMAINS), (name, part)
        for d in DOMAINS:
            assert 0.0 <= r["after"][d]["acc"] <= 1.0
        assert json.loads((runs / name / "result.json").read_text()) == r
        cfg = yaml.safe_load((runs / name / "config.yaml").read_text())
        assert cfg["trainer"]["max_wallclock_s"] == BUDGET_S and cfg["trainer"]["save_every"] == 0
    # Both runs start from the same student and evaluate with the same seed: the same "before".
    for d in DOMAINS:
        a, b = results["reverse_kl"]["before"][d], results["sft"]["before"][d]
        assert a["acc"] == b["acc"] and a["teacher_kl"] == pytest.approx(b["teacher_kl"], rel=1e-4, abs=1e-6)


def test_compare_runs_train_their_own_objective(compared):
    runs, _, _ = compared
    steps = {name: [m for m in read_metrics(runs / name / "metrics.jsonl") if "actor/loss" in m] for name in RUNS}
    assert all(len(s) >= 1 for s in steps.values())
    kl, sft = steps["reverse_kl"][0], steps["sft"][0]
    assert kl["actor/loss"] == pytest.approx(kl["distillation/loss"]) and "actor/sft_loss" not in kl
    assert sft["actor/loss"] == pytest.approx(sft["actor/sft_loss"]) and "distillation/loss" not in sft
    # The teachers' samples get no train/inference correction.
    assert "icepop/masked_frac" in kl and not any(k.startswith("icepop/") for k in sft)
