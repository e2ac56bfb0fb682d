"""Multi-turn rollouts on a real vLLM student engine in a Ray actor (tiny random models): trajectories at
different turns share the engine's batches, environments that raise, hang or flood end only their own
trajectories, the engine's log-probs of every student token equal the trainer's after a weight sync, the
teacher's one prefill of the whole trajectory equals a direct forward, and R3 replays every position.

A random tiny model rarely writes a tool call, so the test environments stop a turn on any digit or
lowercase letter (most of the world's characters): nearly every turn hands over to the environment."""

from __future__ import annotations

import string
import threading
import time

import pytest
import torch
from tiny_models import save_tiny_models
from transformers import AutoModelForCausalLM

from mopd.batch import build_batch
from mopd.config import load_config
from mopd.multiturn import TurnLimits, multi_turn_rollout
from mopd.producer import mask_student_positions, teacher_rollout, verify_samples
from mopd.trainer import Trainer
from rollout.actors import start_student_engines
from rollout.envs import ENVIRONMENTS, EnvStep, register_environment
from rollout.types import EngineSpec
from teachers.hf_teacher import HfTeacher
from teachers.registry import TeacherRegistry

pytestmark = pytest.mark.slow
STOP = tuple(string.digits + string.ascii_lowercase)
LIMITS = TurnLimits(max_tokens=6, max_turns=3, max_total_tokens=30, env_timeout_s=0.5, env_max_observation_chars=20)


class _Echo:
    """Answers every turn with `=<its length>` (the tool), up to the turn limit."""

    stop = STOP

    def step(self, row, trajectory, last_turn):
        return EnvStep(f"={len(last_turn)}", info={"tool_call": 1})


class _Raises:
    stop = STOP

    def step(self, row, trajectory, last_turn):
        raise RuntimeError("tool backend down")


class _Hangs:
    stop = STOP

    def step(self, row, trajectory, last_turn):
        time.sleep(5)


class _Floods:
    stop = STOP

    def step(self, row, trajectory, last_turn):
        return EnvStep("9" * 500)


SECOND_TURN = threading.Event()
WAITED: list[bool] = []  # per environment step of engine 0's trajectories: did engine 1 go on meanwhile


class _WaitsForTheOtherLane:
    """Answers once another engine's trajectory has reached its second turn's environment step."""

    stop = STOP

    def step(self, row, trajectory, last_turn):
        WAITED.append(SECOND_TURN.wait(30))
        return EnvStep(None)


class _SecondTurnSignals:
    stop = STOP

    def step(self, row, trajectory, last_turn):
        if len(trajectory) >= 2:  # an observation is already in it: this is turn 2 or later
            SECOND_TURN.set()
        return EnvStep("=1", info={"tool_call": 1})


for _name, _cls in {"t_echo": _Echo, "t_raise": _Raises, "t_hang": _Hangs, "t_flood": _Floods,
                    "t_wait": _WaitsForTheOtherLane, "t_signal": _SecondTurnSignals}.items():
    if _name not in ENVIRONMENTS:
        register_environment(_name, _cls)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mt")
    return save_tiny_models(d), d


@pytest.fixture(scope="module")
def student(models, ray_local):
    _, d = models
    spec = EngineSpec(str(d / "student"), max_model_len=48, dtype="float32", num_cpus=0.5, omp_threads=1,
                      kv_cache_gb=0.25, capture_routing=True)
    actor = start_student_engines(spec, num_engines=1)[0]
    ray_local.get(actor.ready.remote())
    yield actor
    ray_local.kill(actor)


def rows_and_prompts(tok):
    envs = ["t_echo"] * 4 + ["t_raise", "t_hang", "t_flood", None]
    rows = [{"id": f"r{i}", "domain": "rev", "prompt": f"rev:ab{i}=", **({"env": e} if e else {})}
            for i, e in enumerate(envs)]
    return rows, [tok.encode(r["prompt"], add_special_tokens=False) for r in rows]


def cfg_for(d, *over):
    return load_config("configs/quickstart.yaml", [f"student.path={d}/student", "trainer.lr=1e-2",
                                                    "trainer.warmup_steps=0", "algorithm.objective=pg",
                                                    "algorithm.teacher_top_k=0", *over])


@pytest.fixture(scope="module")
def synced(models, student, ray_local):
    """A trainer one real optimizer step away from the initial weights, synced into the engine, and a
    multi-turn rollout sampled after the sync."""
    tok, d = models
    rows, prompts = rows_and_prompts(tok)
    metrics: dict[str, float] = {}
    first = multi_turn_rollout([student], tok, prompts, rows, n=2, temperature=1.0, top_p=1.0, limits=LIMITS,
                               seed=5)
    teacher = HfTeacher(str(d / "teacher"), max_model_len=48)
    _score(teacher, first)
    tr = Trainer(cfg_for(d, "algorithm.r3=true"), str(d / "student"))
    tr.step(build_batch(first, tok.pad_token_id))
    ray_local.get(student.update_weights.remote(tr.state_dict(), 1))
    samples = multi_turn_rollout([student], tok, prompts, rows, n=2, temperature=1.0, top_p=1.0, limits=LIMITS,
                                 seed=6, metrics=metrics)
    verify_samples(samples, tok)
    _score(teacher, samples)
    return tr, teacher, samples, metrics


def _score(teacher, samples):
    scores = teacher.score([s.sample.prompt_ids + s.sample.response_ids for s in samples],
                           [len(s.sample.prompt_ids) for s in samples])
    for s, sc in zip(samples, scores, strict=True):
        s.teacher, s.teacher_logprobs = "t", sc.logprobs
        mask_student_positions(s)


def test_outcomes_turns_and_masks(synced):
    _, _, samples, metrics = synced
    by_env: dict = {}
    for s in samples:
        by_env.setdefault(s.row.get("env"), []).append(s)
        smp = s.sample
        assert len(smp.student_mask) == len(smp.response_ids) == len(smp.rollout_logprobs)
        assert all(lp == 0.0 for lp, k in zip(smp.rollout_logprobs, smp.student_mask, strict=True) if not k)
        assert smp.policy_version == 1
    # Every env's failure is its own trajectory's outcome (when the student's turn reached the environment).
    for env, outcome in [("t_raise", "env_error"), ("t_hang", "env_timeout"), ("t_flood", "env_flood")]:
        got = {s.sample.meta["outcome"] for s in by_env[env]}
        assert outcome in got, (env, got)
        assert all(sum(s.sample.student_mask) == len(s.sample.response_ids) for s in by_env[env])
    assert any("tool backend down" in s.sample.meta.get("env_info", {}).get("error", "") for s in by_env["t_raise"])
    # The echo tool answered: observations in the trajectory, several turns, trajectories at different turns.
    echo = by_env["t_echo"]
    assert max(s.sample.meta["turns"] for s in echo) >= 2
    assert any(0 in s.sample.student_mask for s in echo)
    assert len({s.sample.meta["turns"] for s in samples}) >= 2
    for s in echo:
        assert len(s.sample.response_ids) <= LIMITS.max_total_tokens and s.sample.meta["turns"] <= LIMITS.max_turns
    # Single-turn rows in the same batch: all student tokens, one turn, no environment.
    plain = by_env[None]
    assert all(s.sample.meta["turns"] == 1 and s.sample.student_mask == [1] * len(s.sample.response_ids)
               for s in plain)
    assert metrics["rollout/env_error"] > 0 and metrics["rollout/env_timeout"] > 0
    assert 0 < metrics["rollout/obs_token_share"] < 1 and metrics["rollout/turns_mean"] > 1
    assert metrics["timing_s/env"] > 0


def test_engine_logprobs_equal_trainer_after_sync_and_r3_replays_every_position(synced, models):
    tok, _ = models
    tr, _, samples, _ = synced
    batch = build_batch(samples, tok.pad_token_id)
    assert batch.routed_experts_BLNK is not None
    old_BT = tr.logprobs(batch)
    mask = batch.mask_BT.bool()
    diff = (old_BT[mask] - batch.rollout_logprobs_BT[mask]).abs().max().item()
    assert diff < 1e-3, diff
    # Earlier turns and observations were captured during the last turn's prefill: every position the engine
    # fed has a record (only each trajectory's final sampled token, never fed, has none) ...
    full_BL = (batch.routed_experts_BLNK >= 0).all(-1).all(-1)
    for b, n in enumerate(batch.lengths()):
        assert full_BL[b, : n - 1].all() and not full_BL[b, n - 1:].any(), b
    # ... and the trainer's forward used exactly the engine's experts there.
    m = tr.step(batch)
    assert m["r3/router_agreement"] == 1.0
    assert m["r3/own_router_agreement"] > 0.95
    assert "mopd/teacher_kl_turn/2" in m


def test_teacher_scores_whole_trajectory_at_student_positions(synced, models):
    _, d = models
    _, _, samples, _ = synced
    ref = AutoModelForCausalLM.from_pretrained(d / "teacher", dtype=torch.float32).eval()
    worst = 0.0
    for s in samples:
        seq, p = s.sample.prompt_ids + s.sample.response_ids, len(s.sample.prompt_ids)
        with torch.no_grad():
            lp = ref(torch.tensor([seq])).logits.float().log_softmax(-1)[0]
        for j, (got, k) in enumerate(zip(s.teacher_logprobs, s.sample.student_mask, strict=True)):
            want = lp[p - 1 + j, seq[p + j]].item() if k else 0.0
            worst = max(worst, abs(got - want))
    assert worst <= 1e-5, worst


def test_vllm_teacher_scores_whole_trajectory(synced, models, ray_local):
    """The vLLM teacher backend, one prefill per trajectory: log-probs and top-k at the student's positions
    equal a transformers forward over the trajectory; observation positions are left out."""
    from teachers.vllm_teacher import start_teacher

    _, d = models
    _, _, samples, _ = synced
    spec = EngineSpec(str(d / "teacher"), max_model_len=48, dtype="float32", num_cpus=0.5, omp_threads=1,
                      kv_cache_gb=0.25, max_top_k=3)
    teacher = start_teacher(spec, replicas=1)[0]
    try:
        multi = [s for s in samples if 0 in s.sample.student_mask]
        assert multi
        scores = ray_local.get(teacher.score.remote([s.sample.prompt_ids + s.sample.response_ids for s in multi],
                                                    [len(s.sample.prompt_ids) for s in multi], 3))
        # The teacher generates multi-turn too (its own evaluation, the SFT baseline's data): with the tool.
        tok, _ = models
        rows, prompts = rows_and_prompts(tok)
        registry = TeacherRegistry()
        registry.register("t", ["rev"], str(d / "teacher"))
        own = teacher_rollout({"t": [teacher]}, registry, prompts, rows, n=1, temperature=1.0, max_tokens=6, seed=3,
                              tokenizer=tok, limits=LIMITS)
    finally:
        ray_local.kill(teacher)
    ref = AutoModelForCausalLM.from_pretrained(d / "teacher", dtype=torch.float32).eval()
    worst = 0.0
    for s, sc in zip(multi, scores, strict=True):
        s.teacher_logprobs, s.teacher_topk_ids, s.teacher_topk_logprobs = sc.logprobs, sc.topk_ids, sc.topk_logprobs
        mask_student_positions(s)
        seq, p = s.sample.prompt_ids + s.sample.response_ids, len(s.sample.prompt_ids)
        with torch.no_grad():
            lp = ref(torch.tensor([seq])).logits.float().log_softmax(-1)[0]
        for j, k in enumerate(s.sample.student_mask):
            if not k:
                assert s.teacher_logprobs[j] == 0.0 and (s.teacher_topk_ids[j] == -1).all()
                continue
            worst = max(worst, abs(s.teacher_logprobs[j] - lp[p - 1 + j, seq[p + j]].item()))
            assert s.teacher_topk_ids[j].tolist() == lp[p - 1 + j].topk(3).indices.tolist()
    assert worst < 1e-3, worst
    assert [x.group for x in own] == list(range(len(rows))) and all(x.teacher == "t" for x in own)
    echo = [x for x in own if x.row.get("env") == "t_echo"]
    assert any(0 in x.sample.student_mask for x in echo) and max(x.sample.meta["turns"] for x in echo) >= 2
    assert [x.sample.meta["outcome"] for x in own if x.row.get("env") == "t_raise"] in (["env_error"], ["done"],
                                                                                         ["length"])
    assert own[-1].sample.student_mask is None  # the single-turn row: the teacher's plain generate


def test_batch_producer_rolls_out_multi_turn_batches_reproducibly(models, student, ray_local):
    """The producer's multi-turn path end to end (rollout thread, teacher scoring, batch): a batch is a function
    of (seed, step) (what a resumed run relies on), and the one-step-off pipeline produces them too."""
    from tiny_config import REQUIRED_OVERRIDES

    from mopd.producer import BatchProducer, Pipeline
    from teachers.hf_teacher import start_hf_group
    from teachers.registry import TeacherRegistry

    tok, d = models
    cfg = load_config(None, [*REQUIRED_OVERRIDES, f"student.path={d}/student", f"teachers.t.path={d}/teacher",
                             "teachers.t.domains=[rev]", "rollout.max_tokens=6", "rollout.max_total_tokens=30",
                             "rollout.max_turns=3", "rollout.n=2", "trainer.prompts_per_step=4",
                             "algorithm.objective=reverse_kl", "algorithm.teacher_top_k=3"])
    teachers = start_hf_group({"t": EngineSpec(str(d / "teacher"), max_model_len=48, num_cpus=0.5)}, 1)
    try:
        rows, prompts = rows_and_prompts(tok)
        rows = [r for r in rows if r.get("env") in ("t_echo", None)]
        prompts = [tok.encode(r["prompt"], add_special_tokens=False) for r in rows]
        producer = BatchProducer(cfg, [student], teachers, TeacherRegistry.from_config(cfg, tok), tok, rows, prompts)
        a, b = producer.get(1), producer.get(1)
        assert [x.sample.response_ids for x in a.samples] == [x.sample.response_ids for x in b.samples]
        assert torch.equal(a.batch.mask_BT, b.batch.mask_BT) and a.digest == b.digest
        student_tokens = sum(sum(x.sample.student_mask) for x in a.samples)
        assert a.batch.mask_BT.sum().item() == student_tokens < sum(len(x.sample.response_ids) for x in a.samples)
        assert a.batch.teacher_topk_ids_BTK is not None
        for key in ("rollout/turns_mean", "rollout/obs_token_share", "timing_s/env", "timing_s/teacher",
                    "rollout/response_length/p90"):
            assert key in a.metrics, key
        # The hf teacher generates multi-turn through the same environment loop (its evaluation, teacher samples).
        own = teacher_rollout(teachers, producer.registry, prompts, rows, n=1, temperature=1.0, max_tokens=6, seed=0,
                              tokenizer=tok, limits=LIMITS)
        echo = [x.sample for x in own if x.row.get("env") == "t_echo"]
        assert any(0 in x.student_mask for x in echo) and max(x.meta["turns"] for x in echo) >= 2
        for x in echo:  # the tool's tokens: context (mask 0, no log-prob), counted as observations
            assert x.meta["obs_tokens"] == len(x.student_mask) - sum(x.student_mask) and x.meta["tool_calls"] >= 1
            assert all(lp == 0.0 for lp, k in zip(x.rollout_logprobs, x.student_mask, strict=True) if not k)
        assert own[-1].sample.student_mask is None  # the single-turn row: the teacher's plain generate
        pipe = Pipeline(producer, max_staleness=1, first_step=1, synced_version=0, last_step=2)
        try:
            one = pipe.get(1, {})
            pipe.weights_sent(1)
            two = pipe.get(2, {})
        finally:
            pipe.close()
        assert [x.sample.response_ids for x in one.samples] == [x.sample.response_ids for x in a.samples]
        assert two.metrics["rollout/turns_mean"] >= 1
    finally:
        for actors in teachers.values():
            for actor in actors:
                ray_local.kill(actor)


def test_trajectories_do_not_depend_on_the_engine_count(models, student):
    """Each turn's seed is a function of (batch seed, prompt, sample, turn): two engines (here the same actor
    twice, so two chunks per round, each handed to the environments as it comes back) give the same batch."""
    tok, _ = models
    rows, prompts = rows_and_prompts(tok)
    rows, prompts = rows[:4] + rows[-1:], prompts[:4] + prompts[-1:]
    one, two = (multi_turn_rollout(engines, tok, prompts, rows, n=2, temperature=1.0, top_p=1.0, limits=LIMITS,
                                   seed=9) for engines in ([student], [student, student]))
    assert [(x.sample.response_ids, x.sample.student_mask) for x in one] == \
           [(x.sample.response_ids, x.sample.student_mask) for x in two]
    assert any(0 in x.sample.student_mask for x in one)


def test_an_engine_goes_on_while_another_engines_environment_is_still_answering(models, student):
    """Engine 0's trajectories wait in their environment until one of engine 1's has reached its second
    turn's environment step. In lock-step rounds that never happens (the next round waits for engine 0's
    environments), so they would end as env_timeout; with a lane per engine, engine 1 goes on meanwhile."""
    tok, _ = models
    SECOND_TURN.clear()
    WAITED.clear()
    rows = [{"id": f"w{i}", "domain": "rev", "prompt": f"rev:ab{i}=", "env": "t_wait" if i < 4 else "t_signal"}
            for i in range(8)]
    prompts = [tok.encode(r["prompt"], add_special_tokens=False) for r in rows]
    limits = TurnLimits(max_tokens=6, max_turns=3, max_total_tokens=30, env_timeout_s=10.0)
    out = multi_turn_rollout([student, student], tok, prompts, rows, n=1, temperature=1.0, top_p=1.0,
                             limits=limits, seed=3)
    waited = [x.sample.meta for x in out[:4]]
    assert any(x.sample.meta["turns"] >= 2 for x in out[4:])  # engine 1 went on past its first turn
    assert SECOND_TURN.is_set()
    assert all(m["outcome"] != "env_timeout" for m in waited), waited
    assert WAITED and all(WAITED), WAITED  # engine 0's environments were asked, and none waited in vain
