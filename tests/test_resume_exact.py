"""Exact resume, fast part: what a checkpoint carries for the steps after it (`mopd.carry`), the token-level
`data/batch_digest`, the pipeline serving carried batches first, the corrupt-newest fallback and
`--resume-from`, stale temporaries at start, and the teacher manifest's refusal. Real files, real torch
serialization, the real Pipeline thread; the slow, end-to-end part (a killed run resumed, an injected fault)
is tests/test_resume_exact_slow.py."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_config import REQUIRED_OVERRIDES

from mopd.carry import CARRY_FILE, carry_key, decode, encode, load_carry
from mopd.checkpoint import checkpoint_problem, intact_checkpoint
from mopd.cli.errors import is_project_error
from mopd.config import load_config
from mopd.manifest import TeacherChangedError, check_teachers, teacher_manifest
from mopd.producer import Pipeline, StepBatch, batch_digest, rows_digest
from mopd.run_dir import RunDirError, prepare_run_dir
from mopd.samples import ScoredSample
from mopd.train import train
from rollout.types import Sample

ROWS = [{"id": f"r{i}", "domain": "add" if i % 2 else "rev", "prompt": "p", "answer": str(i)} for i in range(4)]


def _samples(step: int, bump: float = 0.0) -> list[ScoredSample]:
    g = torch.Generator().manual_seed(step)
    out = []
    for i, row in enumerate(ROWS[:3]):
        n = 3 + i
        s = Sample(prompt_ids=[1, 2, 3 + i], response_ids=torch.randint(4, 50, (n,), generator=g).tolist(),
                   rollout_logprobs=(-torch.rand(n, generator=g, dtype=torch.float64)).tolist(), finish_reason="stop",
                   routed_experts=np.arange(2 * (3 + n), dtype=np.int32).reshape(3 + n, 2, 1), meta={"turns": 1},
                   policy_version=step - 2)
        tl = (-torch.rand(n, generator=g, dtype=torch.float64)).tolist()
        tl[0] += bump
        out.append(ScoredSample(row=row, group=i, sample=s, teacher="t_" + row["domain"], teacher_logprobs=tl,
                                teacher_topk_ids=np.array([[5, 6]] * n), teacher_topk_logprobs=np.array([[-0.1, -2.5]] * n, np.float32),
                                text="x", score=1.0))
    return out


def _step_batch(step: int, bump: float = 0.0) -> StepBatch:
    from mopd.batch import build_batch

    samples = _samples(step, bump)
    return StepBatch(step, samples, build_batch(samples, 0), [r["id"] for r in ROWS[:3]],
                     {"rollout/staleness_max": 1.0, "timing_s/rollout": 0.3})


def _cfg(tmp_path: Path, *extra: str):
    """The quickstart config with its three teachers in folders of this test (config, weights, tokenizer)."""
    over = []
    for name in ("add_teacher", "rev_teacher", "sort_teacher"):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({"vocab_size": 64}))
        (d / "model.safetensors").write_bytes(b"w-" + name.encode())
        (d / "tokenizer.json").write_text("{}")
        over.append(f"teachers.{name}.path={d}")
    return load_config("configs/quickstart.yaml", [*REQUIRED_OVERRIDES, f"logging.run_dir={tmp_path / 'run'}",
                                                   *over, *extra])


def test_batch_digest_covers_tokens_and_teacher_scores_not_only_rows():
    a, b = _samples(3), _samples(3)
    assert batch_digest(a) == batch_digest(b)
    b[1].sample.response_ids[0] += 1  # one sampled token
    assert batch_digest(a) != batch_digest(b)
    assert batch_digest(a) != batch_digest(_samples(3, bump=1e-12))  # one teacher log-prob, by one ulp-ish
    assert rows_digest([s.row["id"] for s in a]) == rows_digest([s.row["id"] for s in b])  # rows: blind to it
    assert batch_digest(a) < 2 ** 53  # exact as a float in metrics.jsonl


def test_carry_round_trips_bit_for_bit_through_weights_only_load(tmp_path):
    batches = {5: _step_batch(5), 6: _step_batch(6)}
    torch.save(encode(batches, "k"), tmp_path / CARRY_FILE)
    back = decode(torch.load(tmp_path / CARRY_FILE, weights_only=True), ROWS, 0)
    assert sorted(back) == [5, 6]
    for step, sb in batches.items():
        got = back[step]
        assert got.digest == sb.digest and got.row_ids == sb.row_ids
        assert got.metrics == {"rollout/staleness_max": 1.0}  # timings are the old run's, not carried
        for name in ("input_ids_BL", "mask_BT", "rollout_logprobs_BT", "teacher_logprobs_BT",
                     "teacher_topk_logprobs_BTK", "routed_experts_BLNK"):
            assert torch.equal(getattr(got.batch, name), getattr(sb.batch, name)), name
        x, y = got.samples[2], sb.samples[2]
        assert x.row is ROWS[2] and x.sample.policy_version == step - 2 and x.sample.meta == {"turns": 1}
        assert np.array_equal(x.sample.routed_experts, y.sample.routed_experts)
        assert x.sample.rollout_logprobs == y.sample.rollout_logprobs  # float64 values, exactly


def test_carry_round_trips_a_multi_turn_batch_with_who_wrote_each_token(tmp_path):
    """A multi-turn sample's `student_mask` (observation tokens 0) and turn metadata come back from a carry,
    so the resumed step's trainer mask is the uninterrupted one's; the digest sees the mask."""
    from mopd.batch import build_batch

    samples = _samples(7)
    for k, s in enumerate(samples):
        n = len(s.sample.response_ids)
        s.sample.student_mask = [1] + [0] * (n - 2) + [1]  # a call, the tool's answer, one more token
        s.sample.meta = {"turns": 2, "tool_calls": 1, "outcome": "done" if k else "env_timeout", "env": "calc",
                         "obs_tokens": n - 2, **({"env_info": {"error": "no answer within 5 s"}} if not k else {}),
                         "env_reward": 1.0}
        s.teacher_logprobs = [lp if m else 0.0 for lp, m in zip(s.teacher_logprobs, s.sample.student_mask, strict=True)]
    sb = StepBatch(7, samples, build_batch(samples, 0), [r["id"] for r in ROWS[:3]], {"rollout/turns_mean": 2.0,
                                                                                      "rollout/obs_token_share": 0.4})
    torch.save(encode({7: sb}, "k"), tmp_path / CARRY_FILE)
    got = decode(torch.load(tmp_path / CARRY_FILE, weights_only=True), ROWS, 0)[7]
    for x, y in zip(got.samples, sb.samples, strict=True):
        assert x.sample.student_mask == y.sample.student_mask and 0 in x.sample.student_mask
        assert x.sample.meta == y.sample.meta and x.teacher_logprobs == y.teacher_logprobs
    assert torch.equal(got.batch.mask_BT, sb.batch.mask_BT) and got.batch.mask_BT.sum() < sum(
        len(s.sample.response_ids) for s in samples)
    assert got.digest == sb.digest and got.metrics == sb.metrics
    # A carry that lost who wrote each token would train observations: the digest tells them apart.
    lost = [dataclasses.replace(s, sample=dataclasses.replace(s.sample, student_mask=None)) for s in got.samples]
    assert batch_digest(lost) != sb.digest


def test_a_carry_from_another_config_is_dropped_and_said(tmp_path):
    cfg = _cfg(tmp_path, "trainer.max_staleness=1")
    torch.save(encode({3: _step_batch(3)}, carry_key(cfg)), tmp_path / CARRY_FILE)
    assert sorted(load_carry(tmp_path, cfg, ROWS, 0)) == [3]
    lines: list[str] = []
    other = _cfg(tmp_path, "trainer.max_staleness=1", "rollout.temperature=0.7")
    assert load_carry(tmp_path, other, ROWS, 0, lines.append) == {}
    assert "another data/rollout/teacher/staleness config" in lines[0]


class _Producer:
    """The producer's interface to the pipeline: launch(step) -> job, finish(job) -> StepBatch (here, made
    from the step alone: what the test checks is which steps the pipeline produces and which it serves)."""

    def __init__(self) -> None:
        self.launched: list[int] = []

    def launch(self, step: int) -> SimpleNamespace:
        self.launched.append(step)
        return SimpleNamespace(step=step)

    def finish(self, job: SimpleNamespace, between=None) -> StepBatch:
        return _step_batch(job.step, bump=0.5)


def test_pipeline_serves_carried_batches_first_and_keeps_what_a_fault_needs():
    prod = _Producer()
    carried = {4: _step_batch(4)}
    p = Pipeline(prod, 1, 4, 3, 10, ready=carried)
    try:
        got = p.get(4, {})
        assert got is carried[4] and 4 not in prod.launched  # the carried batch, not a resampled one
        ahead = p.ahead(4)  # after step 4: batch 5 (the pipeline produced it)
        assert sorted(ahead) == [5] and prod.launched[0] == 5
        p.get(5, {})
        assert sorted(p.salvage(3)) == [4, 5]  # served but not yet standing: kept for a redo
        assert sorted(p.salvage(4)) == [5]
    finally:
        p.close()
    assert not any(t.name == "mopd-pipeline" and t.is_alive() for t in threading.enumerate())


class _MultiTurnProducer(_Producer):
    """Jobs whose rollout is a multi-turn thread (a Future the test completes: its last round is back)."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds: dict[int, Future] = {}

    def launch(self, step: int) -> SimpleNamespace:
        self.launched.append(step)
        self.rounds[step] = Future()
        return SimpleNamespace(step=step, multi_turn=self.rounds[step])

    def finish(self, job: SimpleNamespace, between=None) -> StepBatch:
        job.multi_turn.result()
        return _step_batch(job.step)


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_update_waits_until_the_multi_turn_batch_it_would_meet_is_drawn():
    """The update to version v goes to the engines only once batch v + k, drawn by version v - 1, has all its
    rounds back: a later round of a trajectory never meets newer weights than its first (what makes a
    multi-turn batch a function of the policy that drew it, and a resumed run exact)."""
    prod = _MultiTurnProducer()
    p = Pipeline(prod, 1, 3, 2, 6, ready={3: _step_batch(3)})  # resumed at step 2, batch 3 carried
    try:
        p.get(3, {})
        waited: list[float] = []
        th = threading.Thread(target=lambda: waited.append(p.drawn_before(3)))
        th.start()  # the update to version 3 must wait for batch 4 (launched after version 2 was sent)
        _until(lambda: prod.launched == [4])
        th.join(0.2)
        assert th.is_alive()
        prod.rounds[4].set_result(None)  # batch 4's last round is back
        th.join(5)
        assert not th.is_alive() and waited[0] > 0
        p.weights_sent(3)  # batch 5 may launch now
        p.get(4, {})
        th = threading.Thread(target=lambda: waited.append(p.drawn_before(4)))
        th.start()
        _until(lambda: prod.launched == [4, 5])
        th.join(0.2)
        assert th.is_alive()
        prod.rounds[5].set_result(None)
        th.join(5)
        assert not th.is_alive() and len(waited) == 2
        p.weights_sent(4)
        assert p.drawn_before(6) == 0.0  # batch 7 is past the last step: nothing to wait for
    finally:
        for f in prod.rounds.values():
            if not f.done():
                f.set_result(None)
        p.close()
    sync = Pipeline(_MultiTurnProducer(), 0, 1, 0, 6)
    try:
        assert sync.drawn_before(1) == 0.0  # k = 0: batch j waits for version j - 1 itself
    finally:
        for f in sync.producer.rounds.values():
            f.set_result(None)
        sync.close()


def _checkpoint(run: Path, step: int, weights: bytes | None = None) -> Path:
    ck = run / "checkpoints" / f"step_{step}"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "config.json").write_text("{}")
    save_file({"w": torch.full((64,), float(step))}, ck / "model" / "model.safetensors")
    if weights is not None:
        (ck / "model" / "model.safetensors").write_bytes(weights)
    torch.save({"x": 1}, ck / "optim.pt")
    torch.save({"torch": torch.get_rng_state()}, ck / "rng.pt")
    (ck / "state.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest").write_text(f"step_{step}\n")
    return ck


def test_corrupt_newest_checkpoint_falls_back_loudly_and_resume_from_picks_one(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 2)
    _checkpoint(run, 4)
    ck6 = _checkpoint(run, 6)
    f = ck6 / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])  # a kill mid-copy, a full disk: truncated
    assert "model/model.safetensors is truncated" in checkpoint_problem(ck6)
    (run / "checkpoints" / ".step_8.tmpk2j3").mkdir()  # a kill during the next save
    lines: list[str] = []
    assert prepare_run_dir(run, resume=True, overwrite=False, log=lines.append) == run / "checkpoints" / "step_4"
    warn = [ln for ln in lines if "WARNING" in ln]
    assert len(warn) == 1 and "skipping checkpoint step_6: model/model.safetensors is truncated" in warn[0], lines
    assert any("removed 1 stale temporary" in ln and ".step_8.tmpk2j3" in ln for ln in lines), lines
    assert not (run / "checkpoints" / ".step_8.tmpk2j3").exists()
    # --resume-from: the one asked for, or a clear refusal naming those there are.
    assert prepare_run_dir(run, False, False, log=lines.append, resume_from="step_2") == run / "checkpoints" / "step_2"
    assert prepare_run_dir(run, False, False, log=lines.append, resume_from="4") == run / "checkpoints" / "step_4"
    with pytest.raises(RunDirError, match=r"--resume-from step_6: .* is corrupt: model/model.safetensors is "
                                          r"truncated .*give another one \(step_2, step_4, step_6\)"):
        prepare_run_dir(run, False, False, log=lines.append, resume_from="step_6")
    with pytest.raises(RunDirError, match=r"--resume-from step_9: no such checkpoint"):
        prepare_run_dir(run, False, False, log=lines.append, resume_from="step_9")
    for ck in ("step_2", "step_4"):
        (run / "checkpoints" / ck / "rng.pt").write_bytes(b"\0" * 10)
    assert intact_checkpoint(run, lines.append) is None  # all corrupt: None (prepare_run_dir says so)
    with pytest.raises(RunDirError, match="no intact checkpoint"):
        prepare_run_dir(run, resume=True, overwrite=False, log=lines.append)


def test_teacher_manifest_names_what_changed_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("MOPD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path)
    saved = teacher_manifest(cfg)
    assert saved["add_teacher"]["domains"] == ["add"] and saved["add_teacher"]["backend"] == "vllm"
    assert set(saved["add_teacher"]["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    check_teachers(saved, teacher_manifest(cfg), "step_4", allow=False)  # unchanged: nothing to say
    (tmp_path / "rev_teacher" / "model.safetensors").write_bytes(b"re-exported")
    now = teacher_manifest(cfg)
    with pytest.raises(TeacherChangedError) as e:
        check_teachers(saved, now, "step_4", allow=False)
    msg = str(e.value)
    assert f"teacher 'rev_teacher': the files under {tmp_path / 'rev_teacher'} changed (model.safetensors changed)" in msg
    assert "add_teacher" not in msg and "--allow-teacher-change" in msg
    lines: list[str] = []
    check_teachers(saved, now, "step_4", allow=True, log=lines.append)
    assert lines and lines[0].startswith("--allow-teacher-change: resuming step_4 with changed teachers")


def test_resume_with_a_changed_teacher_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """Through the real session: refused before the cluster, the world or the model folders are touched (a
    project error: `mopd train` prints it as one `mopd: error:` line, exit 2); the run dir is left as it was."""
    monkeypatch.setenv("MOPD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    ck = _checkpoint(run, 4)
    (ck / "state.json").write_text(json.dumps({"step": 4, "teachers": teacher_manifest(cfg)}))
    (tmp_path / "add_teacher" / "tokenizer.json").write_text('{"changed": 1}')
    with pytest.raises(TeacherChangedError) as e:
        train(cfg, resume=True, log=lambda *_: None)
    assert str(e.value).startswith("--resume: the teachers changed since checkpoint step_4: teacher 'add_teacher': "
                                   f"the files under {tmp_path / 'add_teacher'} changed (tokenizer.json changed)")
    assert "--allow-teacher-change" in str(e.value)
    assert is_project_error(e.value) and not (run / "config.yaml").exists() and not (run / ".lock").exists()


def test_resume_from_a_missing_or_corrupt_checkpoint_is_one_error_line(tmp_path, capsys):
    from mopd.cli import main

    run = tmp_path / "run"
    _checkpoint(run, 2)
    bad = _checkpoint(run, 4) / "optim.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    over = [*REQUIRED_OVERRIDES, f"logging.run_dir={run}"]
    for name, says in (("step_7", "no such checkpoint"), ("step_4", "is corrupt: optim.pt is truncated")):
        code = main(["train", "configs/quickstart.yaml", *over, "--resume-from", name])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"mopd: error: --resume-from {name}: ") and says in err and "step_2" in err, err
