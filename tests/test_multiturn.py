"""Multi-turn trajectories without an engine: who wrote each token decides what trains (observation tokens get
no gradient, whatever the teacher or the engine said about them), per-turn metrics, observation tokenization,
the config keys and the data check of a row's `env`."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from test_trainer import cfg_for, make_samples, weights
from tiny_models import save_tiny_models

from mopd.batch import build_batch
from mopd.config import ConfigError, load_config
from mopd.data import DataError, load_rows
from mopd.multiturn import length_metrics, observation_ids, trajectory_metrics
from mopd.producer import mask_student_positions
from mopd.trainer import Trainer
from rollout.types import Sample
from stability.diagnostics import teacher_kl_per_turn, turn_index


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_tiny_models(d), d


def as_multi_turn(samples, obs_at=(2, 3)):
    """Mark response positions `obs_at` as an environment's observation (two student turns around it)."""
    for s in samples:
        mask = [0 if j in obs_at else 1 for j in range(len(s.sample.response_ids))]
        s.sample.student_mask = mask
        s.sample.rollout_logprobs = [lp if m else 0.0 for lp, m in zip(s.sample.rollout_logprobs, mask, strict=True)]
        s.sample.meta = {"turns": 2, "tool_calls": 1, "outcome": "done"}
    return samples


def scrambled(samples, obs_at=(2, 3)):
    """The same trajectories with wild teacher scores, top-k and engine log-probs at the observation positions."""
    out = copy.deepcopy(samples)
    for s in out:
        for j in obs_at:
            s.teacher_logprobs[j] = -50.0 if j % 2 else float("nan")
            s.sample.rollout_logprobs[j] = 7.0
            if s.teacher_topk_ids is not None:
                K = s.teacher_topk_ids.shape[1]
                s.teacher_topk_ids[j] = 5 + np.arange(K)
                s.teacher_topk_logprobs[j] = -0.1 - 13.0 * np.arange(K)
    return out


def test_batch_mask_is_response_times_student_mask(models):
    tok, d = models
    samples = make_samples(tok, d / "teacher", n=2)
    single = build_batch(samples, tok.pad_token_id).mask_BT.clone()
    multi = build_batch(as_multi_turn(copy.deepcopy(samples)), tok.pad_token_id).mask_BT
    p = len(samples[0].sample.prompt_ids)
    assert single[0, p - 1:p + 5].tolist() == [1.0] * 6
    assert multi[0, p - 1:p + 5].tolist() == [1, 1, 0, 0, 1, 1]
    assert torch.equal(multi, single * multi)  # never adds a position
    assert turn_index(multi)[0, p - 1:p + 5].tolist() == [1, 1, 0, 0, 2, 2]


@pytest.mark.parametrize("objective,top_k,over", [
    ("pg", 0, ["algorithm.correction=icepop"]),
    ("mixed", 4, ["algorithm.correction=tis", "trainer.logits_chunk_tokens=3",
                  "trainer.max_tokens_per_micro_batch=40"]),
])
def test_observation_tokens_get_no_gradient(models, objective, top_k, over):
    """Changing everything the teacher and the engine said at observation positions leaves the step
    bit-identical: those tokens reach no loss, advantage, correction weight or KL term."""
    tok, d = models
    base = as_multi_turn(make_samples(tok, d / "teacher", n=6, top_k=top_k))
    cfg = cfg_for(d, f"algorithm.objective={objective}", f"algorithm.teacher_top_k={top_k}", *over)
    after = []
    for samples in (base, scrambled(base)):
        torch.manual_seed(0)
        tr = Trainer(cfg, cfg.student.path)
        m = tr.step(build_batch(samples, tok.pad_token_id))
        after.append((weights(tr), m))
    (w0, m0), (w1, m1) = after
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], weights(Trainer(cfg, cfg.student.path))[k]) for k in w0)  # it did step
    shared = [k for k in m0 if not k.startswith("timing_s/") and not k.startswith("perf/")]
    assert all(m0[k] == m1[k] or (math.isnan(m0[k]) and math.isnan(m1[k])) for k in shared), \
        [k for k in shared if m0[k] != m1[k]]
    assert "mopd/teacher_kl_turn/1" in m0 and "mopd/teacher_kl_turn/2" in m0


def test_teacher_kl_per_turn_splits_the_mask():
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 0, 0]])
    student = torch.zeros(2, 7)
    teacher = -torch.tensor([[1.0, 1, 9, 9, 3, 3, 9], [1, 9, 3, 3, 3, 9, 9]])
    got = teacher_kl_per_turn(student, teacher, mask)
    assert got == {"mopd/teacher_kl_turn/1": 1.0, "mopd/teacher_kl_turn/2": 3.0}
    assert teacher_kl_per_turn(student, teacher, torch.tensor([[1.0, 1, 1, 0, 0, 0, 0]] * 2)) == {}


def test_teacher_scores_are_kept_at_student_positions_only(models):
    tok, d = models
    s = as_multi_turn(make_samples(tok, d / "teacher", n=1, top_k=3))[0]
    before = list(s.teacher_logprobs)
    mask_student_positions(s)
    assert [lp for lp, m in zip(s.teacher_logprobs, s.sample.student_mask, strict=True) if not m] == [0.0, 0.0]
    assert [a for a, m in zip(s.teacher_logprobs, s.sample.student_mask, strict=True) if m] == \
           [b for b, m in zip(before, s.sample.student_mask, strict=True) if m]
    assert (s.teacher_topk_ids[2] == -1).all() and (s.teacher_topk_logprobs[2] == -float("inf")).all()
    assert (s.teacher_topk_ids[1] >= 0).all() and s.teacher_topk_ids.shape[1] == 3


def test_trajectory_and_length_metrics():
    a = Sample([1], [5, 6, 7, 8], [0.0] * 4, "stop", meta={"turns": 2, "tool_calls": 1, "outcome": "done"},
               student_mask=[1, 0, 0, 1])
    b = Sample([1], [5, 6], [0.0] * 2, "stop", meta={"turns": 1, "tool_calls": 0, "outcome": "env_timeout"},
               student_mask=[1, 1])
    m = trajectory_metrics([a, b])
    assert m["rollout/turns_mean"] == 1.5 and m["rollout/tool_calls_mean"] == 0.5
    assert m["rollout/env_timeout"] == 0.5 and m["rollout/env_error"] == 0.0
    assert m["rollout/obs_token_share"] == pytest.approx(2 / 6)
    lm = length_metrics([a, b])
    assert (lm["rollout/response_length/min"], lm["rollout/response_length/max"]) == (2.0, 4.0)
    assert lm["rollout/response_length/p50"] == 3.0


def test_observation_ids_plain_and_given_ids(models):
    tok, _ = models
    assert observation_ids(tok, "=42") == tok.encode("=42", add_special_tokens=False)
    assert observation_ids(tok, [3, 4]) == [3, 4]


@pytest.mark.parametrize("key,value,msg", [("max_turns", 0, "rollout.max_turns"),
                                           ("max_total_tokens", -1, "rollout.max_total_tokens"),
                                           ("env_timeout_s", 0, "rollout.env_timeout_s"),
                                           ("env_max_observation_chars", 0, "rollout.env_max_observation_chars")])
def test_multi_turn_keys_are_checked(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config("configs/quickstart.yaml", [f"rollout.{key}={value}"])
    cfg = load_config("configs/quickstart.yaml", ["rollout.max_total_tokens=40"])
    assert cfg.rollout.response_budget == 40


def test_row_env_must_be_registered(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"prompt": "calc(1+2)", "domain": "add", "env": "calc"}) + "\n"
                 + json.dumps({"prompt": "x", "domain": "add", "env": "nope"}) + "\n")
    with pytest.raises(DataError, match=r"line 2.*'nope'.*registered: \[.*'calc'"):
        load_rows([str(f)])
    f.write_text(json.dumps({"prompt": "calc(1+2)", "domain": "add", "env": "calc"}) + "\n")
    assert load_rows([str(f)])[0]["env"] == "calc"


def test_preflight_scores_a_multi_turn_trajectory(models):
    """Rows naming an environment add a check: the teacher's scores of a trajectory's first turn must not move
    when the observation and the next turn follow it (one prefill of the whole trajectory, as training sends).
    A teacher that keeps only the last tokens of a long request (a truncating server) fails it."""
    from test_preflight import TransformersTeacher
    from tiny_config import REQUIRED_OVERRIDES

    from teachers.preflight import format_report, run_preflight

    tok, d = models
    rows = [{"prompt": "add:12+34=", "answer": "46", "domain": "add", "id": "a0", "env": "calc"}]
    cfg = load_config(None, [*REQUIRED_OVERRIDES, f"teachers.t.path={d}/teacher", "teachers.t.domains=[add]"])

    class Truncating(TransformersTeacher):
        def score(self, sequences, prompt_lens, top_k=0):
            keep = 12
            cut = [max(0, len(s) - keep) for s in sequences]
            return super().score([s[c:] for s, c in zip(sequences, cut, strict=True)],
                                 [max(1, p - c) for p, c in zip(prompt_lens, cut, strict=True)], top_k)

    good = run_preflight(cfg, {"t": [TransformersTeacher(d / "teacher")]}, tok, rows)
    assert [c.ok for c in good if c.name == "multi_turn"] == [True], format_report(good)
    bad = run_preflight(cfg, {"t": [Truncating(d / "teacher")]}, tok, rows)
    assert [c.ok for c in bad if c.name == "multi_turn"] == [False], format_report(bad)
    single = run_preflight(cfg, {"t": [TransformersTeacher(d / "teacher")]}, tok, [{**rows[0], "env": None}])
    assert not [c for c in single if c.name == "multi_turn"]


def test_observation_ids_use_the_chat_templates_tool_turn(models):
    """A tokenizer with a chat template gets the tool message as the template renders it after an exchange
    (its turn markers included); a template without a tool role falls back to the plain text."""
    tok, _ = models
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}{{ m.role[0] }}:{{ m.content }}|{% endfor %}"
                         "{% if add_generation_prompt %}a:{% endif %}")
    assert tok.decode(observation_ids(tok, "=42")) == "t:=42|a:"
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}"
                         "{% endif %}{{ m.content }}{% endfor %}")
    assert observation_ids(tok, "=42") == tok.encode("=42", add_special_tokens=False)


def test_a_teachers_token_share_counts_student_tokens_only():
    from mopd.producer import scored_tokens
    from mopd.samples import ScoredSample

    a = Sample([1], [5, 6, 7, 8], [0.0] * 4, "stop", student_mask=[1, 0, 0, 1])
    b = Sample([1], [5, 6], [0.0] * 2, "stop")
    got = scored_tokens([ScoredSample({}, 0, a, teacher="mul"), ScoredSample({}, 1, b, teacher="carry"),
                         ScoredSample({}, 2, b, teacher="mul")])
    assert got == {"mul": 4, "carry": 2}  # mul: 2 of the tool trajectory's 4 tokens are the observation's
