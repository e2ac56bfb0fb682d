"""The environment contract: registry, the calculator tool, and failures that become trajectory outcomes."""

from __future__ import annotations

import time

import pytest

from rollout.envs import CalcEnv, EnvStep, calculate, make_env, register_environment, run_step


def test_calc_answers_a_call_and_ends_without_one():
    env = make_env("calc")
    assert isinstance(env, CalcEnv)
    assert run_step(env, {}, [], "i need calc(347*829)").observation == "=287663"
    assert run_step(env, {}, [], "calc(2+3*4-1)").observation == "=13"
    assert run_step(env, {}, [], "the answer is 5").done
    bad = run_step(env, {}, [], "calc(2**99)")
    assert bad.observation == "=error" and bad.outcome == "ok"


@pytest.mark.parametrize("expr", ["__import__('os')", "2**3", "a+1", "1/0", "9" * 30 + "*" + "9" * 30])
def test_calc_refuses_anything_but_integer_arithmetic(expr):
    with pytest.raises((ValueError, SyntaxError)):
        calculate(expr)


class _Raises:
    stop = (")",)

    def step(self, row, trajectory, last_turn):
        raise RuntimeError("tool backend down")


class _Hangs:
    stop = (")",)

    def step(self, row, trajectory, last_turn):
        time.sleep(30)


class _Floods:
    stop = (")",)

    def step(self, row, trajectory, last_turn):
        return EnvStep("x" * 100_000)


@pytest.mark.parametrize("env, outcome, says", [(_Raises(), "env_error", "tool backend down"),
                                                (_Hangs(), "env_timeout", "within 0.2 s"),
                                                (_Floods(), "env_flood", "100000")])
def test_a_failing_environment_is_an_outcome_not_a_crash(env, outcome, says):
    step = run_step(env, {}, [], "calc(1)", timeout_s=0.2, max_observation_chars=1000)
    assert step.done and step.outcome == outcome and says in step.info["error"]


def test_registry_refuses_a_second_factory_under_a_taken_name_and_names_the_known_ones():
    register_environment("calc", CalcEnv)  # the same factory again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_environment("calc", _Raises)
    with pytest.raises(ValueError, match=r"no environment named 'nope'.*calc"):
        make_env("nope")
