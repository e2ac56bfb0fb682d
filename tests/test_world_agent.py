"""The agentic world's pieces: the tool domain (mul, rows that name the calc environment), the long-reasoning
domain (carry, addition written column by column), observation positions masked out of the SFT labels, the
world-side multi-turn evaluation loop against the real calc environment, and the plain teachers' table rows."""

from __future__ import annotations

import random

import pytest
import torch

from mopd.config import ConfigError, load_config
from mopd.world.accuracy import accuracy, multi_turn_generate
from mopd.world.build import config_hash
from mopd.world.config import WorldConfig, world_config
from mopd.world.models import build_teacher
from mopd.world.report import plain_teacher_table, world_table
from mopd.world.sft import IGNORE, collate, encode_sft_examples, sft
from mopd.world.tasks import (
    CARRY_DIGITS,
    carry_solution,
    final_answer,
    gen_carry,
    gen_mul,
    make_rows,
    sft_target,
    trajectory_text,
)
from mopd.world.tokenizer import CHARS, build_tokenizer
from rewards.verifiers import DOMAIN_VERIFIERS, verify
from rollout.envs import ENV, STUDENT, CalcEnv, register_environment

# ---------------------------------------------------------------- the tool domain


def test_mul_rows_carry_the_calc_environment_and_its_real_answer():
    rng = random.Random(0)
    for _ in range(300):
        p, a = gen_mul(rng)
        x, y = p.removeprefix("mul:").removesuffix("=").split("*")
        assert int(a) == int(x) * int(y) and 3 <= len(x) <= 4 and 3 <= len(y) <= 4 and x[0] != "0" != y[0]
    rows = make_rows("mul", 20, "train", seed=0)
    r = rows[0]
    assert set(r) == {"id", "prompt", "domain", "answer", "env", "turns", "verifier"}
    assert (r["env"], r["verifier"], DOMAIN_VERIFIERS["mul"]) == ("calc", "world_final", "world_final")
    call = "calc(" + r["prompt"][4:-1] + ")"
    # The observation is the calc environment's own answer; the teacher copies it after `|`.
    assert r["turns"] == [[STUDENT, call], [ENV, "=" + r["answer"]], [STUDENT, "|" + r["answer"]]]
    assert CalcEnv().step(r, [], call).observation == "=" + r["answer"]
    text = trajectory_text(r["turns"])
    assert all(c in CHARS for c in r["prompt"] + text)
    assert verify("mul", text + "<eos>", r["answer"]) == 1.0 and final_answer(text) == r["answer"]
    assert verify("mul", text[: text.rindex("|")], r["answer"]) == 0.0  # the observation alone is no answer
    assert verify("mul", r["answer"], r["answer"]) == 1.0  # an answer without the tool is still an answer
    # The teacher learns the trajectory; the plain teacher the bare answer; the row itself is not changed.
    assert sft_target(r)["answer"] == text and sft_target(r, plain=True)["answer"] == r["answer"]
    assert "turns" not in sft_target(r, plain=True) and r["answer"] != text


# ---------------------------------------------------------------- the long-reasoning domain


def _column_sum(x: str, y: str) -> str:
    """Schoolbook addition with an explicit carry list (not tasks.carry_solution)."""
    carries, out = [0], []
    for a, b in zip(reversed(x), reversed(y), strict=True):
        s = int(a) + int(b) + carries[-1]
        out.append(str(s % 10))
        carries.append(s // 10)
    return str(carries[-1]) + "".join(reversed(out))


def test_carry_solution_is_one_fixed_width_state_per_column_then_the_sum():
    sol = carry_solution("carry:8317+7264=")
    steps, answer = sol.split("|")
    states = steps.split(" ")
    assert answer == _column_sum("8317", "7264") == "15581"
    assert states[0] == ".831+.726,7+4+0=11,1..." and states[1] == "..83+..72,1+6+1=08,81.."
    assert states[-1] == "....+....,8+7+0=15,5581"
    assert len(states) == CARRY_DIGITS and {len(s) for s in states} == {3 * CARRY_DIGITS + 11}
    assert len(sol) == 101 and all(c in CHARS for c in sol)
    rng = random.Random(1)
    for _ in range(200):
        p, a = gen_carry(rng)
        x, y = p.removeprefix("carry:").removesuffix("=").split("+")
        assert a == _column_sum(x, y) and len(p) == 16
        assert final_answer(carry_solution(p)) == a and verify("carry", carry_solution(p) + "<eos>", a) == 1.0
    row = make_rows("carry", 1, "train", seed=0)[0]
    assert row["solution"] == carry_solution(row["prompt"]) and "env" not in row
    assert sft_target(row, plain=True)["answer"] == row["answer"]


# ---------------------------------------------------------------- observation tokens get no SFT loss


def test_sft_labels_mask_the_observation_positions():
    tok = build_tokenizer(64)
    r = make_rows("mul", 1, "train", seed=0)[0]
    (ids, plen, observed), = encode_sft_examples(tok, [sft_target(r)])
    call, obs, tail = (text for _, text in r["turns"])
    assert tok.decode(ids[plen:], skip_special_tokens=False) == call + obs + tail + "<eos>"
    assert observed == list(range(plen + len(call), plen + len(call) + len(obs)))
    labels = collate([(ids, plen, observed), (ids[:plen + 3], plen)], tok.pad_token_id)["labels"]
    scored = [k for k, v in enumerate(labels[0].tolist()) if v != IGNORE]
    # Prompt and observation: no loss; the call, the answer and EOS are the model's own tokens.
    assert scored == [k for k in range(plen, len(ids)) if k not in observed]
    assert tok.decode(labels[0][labels[0] != IGNORE], skip_special_tokens=False) == call + tail + "<eos>"
    assert (labels[1] != IGNORE).sum() == 3  # a row without observations as before



# ---------------------------------------------------------------- the world's multi-turn evaluation loop


@pytest.fixture(scope="module")
def tool_teacher():
    """A tiny teacher overfit on a handful of tool trajectories (observations masked), in a few seconds."""
    torch.manual_seed(0)
    tok = build_tokenizer(64)
    rows = make_rows("mul", 4, "eval", seed=0)
    model = build_teacher(tok, 0, num_hidden_layers=2, hidden_size=64, intermediate_size=128, head_dim=16,
                          max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        sft(model, tok, [sft_target(r) for r in rows], steps=150, batch_size=4, lr=1e-2, seed=0, warmup_steps=5)
    return model, tok, rows


def test_multi_turn_loop_runs_the_calc_environment_between_turns(tool_teacher):
    model, tok, rows = tool_teacher
    trajs = multi_turn_generate(model, tok, rows, max_new_tokens=40)
    for r, traj in zip(rows, trajs, strict=True):
        # The model's call, then the real environment's answer to it, then the model's own last turn.
        assert [a for a, _ in traj] == [STUDENT, ENV, STUDENT]
        assert traj[0][1].startswith("calc(") and traj[0][1].endswith(")")
        assert traj[1][1] == CalcEnv().step(r, [], traj[0][1]).observation
        assert traj[2][1].endswith("<eos>")
    assert accuracy(model, tok, rows) == {"mul": 1.0}
    # Without its environment the same model cannot answer: it stops at the call.
    no_env = [{k: v for k, v in r.items() if k != "env"} for r in rows]
    assert accuracy(model, tok, no_env) == {"mul": 0.0}


def test_multi_turn_loop_limits_turns_and_tokens_and_survives_a_failing_environment(tool_teacher):
    model, tok, rows = tool_teacher
    one = multi_turn_generate(model, tok, rows[:2], max_new_tokens=40, max_turns=1)
    assert all([a for a, _ in t] == [STUDENT] and t[0][1].endswith(")") for t in one)  # no observation after
    short = multi_turn_generate(model, tok, rows[:2], max_new_tokens=5)
    assert all(len(tok.encode(trajectory_text(t), add_special_tokens=False)) <= 5 for t in short)

    class Broken(CalcEnv):
        def step(self, row, trajectory, last_turn):
            raise RuntimeError("tool down")

    register_environment("world-test-broken", Broken)
    broken = [{**r, "env": "world-test-broken"} for r in rows[:2]]
    trajs = multi_turn_generate(model, tok, broken, max_new_tokens=40)
    assert all([a for a, _ in t] == [STUDENT] for t in trajs)  # the trajectory ends at the failed step
    assert accuracy(model, tok, broken) == {"mul": 0.0}


def test_hf_teacher_rolls_out_the_calc_tool_through_the_rollout_loop(tool_teacher, ray_local, tmp_path):
    """An `hf` teacher generates multi-turn through the same environment loop as the student (teacher samples
    for the SFT objective, the teachers' evaluation): the real calc tool answers its call, the answer's tokens
    are context (mask 0), its own turns are its (mask 1). Slow (a Ray actor), lean: a 2-layer model."""
    from mopd.multiturn import TurnLimits
    from mopd.producer import teacher_rollout, verify_samples
    from mopd.world.models import save_model
    from rollout.types import EngineSpec
    from teachers.hf_teacher import start_hf_group
    from teachers.registry import TeacherRegistry

    model, tok, rows = tool_teacher
    save_model(model, tok, tmp_path / "mul")
    registry = TeacherRegistry()
    registry.register("mul_teacher", ["mul"], str(tmp_path / "mul"), backend="hf")
    teachers = start_hf_group({"mul_teacher": EngineSpec(str(tmp_path / "mul"), max_model_len=64, num_cpus=0.5)}, 1)
    prompts = [tok.encode(r["prompt"], add_special_tokens=False) for r in rows]
    try:
        got = teacher_rollout(teachers, registry, prompts, rows, n=1, temperature=0.0, max_tokens=40, seed=0,
                              tokenizer=tok, limits=TurnLimits(max_tokens=40, max_turns=3))
    finally:
        ray_local.kill(teachers["mul_teacher"][0])
    verify_samples(got, tok)
    for r, s in zip(rows, got, strict=True):
        smp = s.sample
        call = "calc(" + r["prompt"][4:-1] + ")"
        obs = tok.encode(CalcEnv().step(r, [], call).observation, add_special_tokens=False)
        first = len(tok.encode(call, add_special_tokens=False))
        assert tok.decode(smp.response_ids[:first]) == call  # the teacher's call, ended by the env's stop string
        assert smp.response_ids[first:first + len(obs)] == obs  # the real tool's answer, as tokens
        assert smp.student_mask == [1] * first + [0] * len(obs) + [1] * (len(smp.response_ids) - first - len(obs))
        assert smp.meta["turns"] == 2 and smp.meta["tool_calls"] == 1 and smp.meta["outcome"] == "done"
        assert s.teacher == "mul_teacher" and s.score == 1.0  # `|<answer>` and EOS after reading the tool


# ---------------------------------------------------------------- config and table


def test_plain_teachers_are_checked_and_keep_old_worlds_hashes():
    assert config_hash(WorldConfig()) == config_hash(WorldConfig(plain_teachers=[]))
    assert config_hash(WorldConfig(domains=["mul"], plain_teachers=["mul"])) != config_hash(WorldConfig(domains=["mul"]))
    with pytest.raises(ConfigError, match="plain_teachers"):
        WorldConfig(domains=["mul"], plain_teachers=["carry"])


def test_the_agent_config_is_a_world_of_its_own():
    cfg = load_config("configs/quickstart_agent.yaml")
    world = world_config(cfg)
    assert (world.dir, world.domains, world.plain_teachers) == (".cache/world_agent", ["mul", "carry"],
                                                                 ["mul", "carry"])
    assert sorted(cfg.teachers) == ["carry_teacher", "mul_teacher"]
    assert all(p.startswith(".cache/world_agent/") for p in [cfg.student.path, *cfg.data.train_files])
    assert cfg.data.max_prompt_tokens + cfg.rollout.max_tokens + 1 <= world.max_positions
    assert cfg.rollout.max_tokens >= 102  # carry's 101 characters + EOS
    assert cfg.rollout.max_turns >= 2  # mul: the call, then the answer


def test_world_table_shows_plain_teachers_on_their_own_domain():
    info = {"dir": "/w", "domains": ["mul", "carry"], "plain_teachers": ["mul", "carry"],
            "timings": {"total": {"wall_s": 99.6}},
            "accuracy": {"teacher/mul": {"mul": 1.0, "carry": 0.0}, "teacher/mul-plain": {"mul": 0.01},
                         "teacher/carry": {"mul": 0.0, "carry": 0.97}, "teacher/carry-plain": {"carry": 0.2},
                         "student": {"mul": 0.4, "carry": 0.1}}}
    assert world_table(info).splitlines()[2:] == [
        "| model | mul | carry |", "|---|---|---|", "| teacher/mul | 1.000 | 0.000 |",
        "| teacher/mul (no tool) | 0.010 | - |", "| teacher/carry | 0.000 | 0.970 |",
        "| teacher/carry (no chain) | - | 0.200 |", "| student | 0.400 | 0.100 |"]
    note = plain_teacher_table(info).splitlines()
    assert note[2:] == ["| domain | teacher | teacher without | without |", "|---|---|---|---|",
                        "| mul | 1.000 | 0.010 | no tool |", "| carry | 0.970 | 0.200 | no chain |"]
    assert plain_teacher_table({**info, "plain_teachers": []}) == ""
