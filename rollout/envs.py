"""Environments for multi-turn rollouts: what answers the student between its turns (a tool, a game, a user).

An environment is a leaf the rollout stage calls: pure Python, no Ray, no loop, no teacher. A data row names
one in its `env` field (rows without one stay single-turn). The producer generates a student turn until EOS,
the length limit or one of the environment's `stop` strings (the end of a tool call); on a stop string it asks
the environment for the next observation, appends its tokens as context (no loss, no teacher term) and lets
the student go on, up to `rollout.max_turns` and `rollout.max_total_tokens`.

An environment that raises, hangs or floods must not crash the run: `run_step` turns each into a clear
per-trajectory outcome (`env_error`, `env_timeout`, `env_flood`), the trajectory ends there and is trained on
as far as it got, and the outcome is counted in the step's metrics.
"""

from __future__ import annotations

import ast
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Who wrote a piece of the trajectory: the student's own tokens are trained on, the environment's are context.
STUDENT, ENV = "student", "env"
# Per-trajectory outcomes. `done`: the student ended (EOS) or the environment said so; `max_turns`,
# `max_total_tokens`: a limit ended it; the `env_*` ones: the environment failed and the trajectory ends.
OUTCOMES = ("done", "max_turns", "max_total_tokens", "length", "env_error", "env_timeout", "env_flood")


@dataclass
class EnvStep:
    """The environment's answer to one student turn.

    `observation` is appended to the trajectory as context: text (tokenized with the student's tokenizer) or
    token ids; None ends the trajectory. `reward` is an outcome reward when the environment knows one (else the
    row's verifier scores the final text). `outcome` is "ok" while the trajectory goes on.
    """

    observation: str | list[int] | None = None
    reward: float | None = None
    outcome: str = "ok"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.observation is None


class Env(Protocol):
    """One trajectory's environment (the factory makes a fresh one per trajectory, so it may keep state)."""

    # Strings that end a student turn and hand over to the environment (kept in the student's text).
    stop: Sequence[str]

    def step(self, row: Mapping[str, Any], trajectory: Sequence[tuple[str, str]], last_turn: str) -> EnvStep:
        """Answer the student's `last_turn`; `trajectory` is every earlier (author, text) piece, prompt excluded."""
        ...


EnvFactory = Callable[[], Env]
ENVIRONMENTS: dict[str, EnvFactory] = {}


def register_environment(name: str, factory: EnvFactory | None = None):
    """Register an environment factory under `name` (usable as a decorator on a class or function).

    Re-registering the same factory is a no-op; another one under a taken name is refused, as for verifiers.
    """

    def add(fn: EnvFactory) -> EnvFactory:
        if ENVIRONMENTS.get(name, fn) is not fn:
            raise ValueError(f"a different environment is already registered as {name!r}")
        ENVIRONMENTS[name] = fn
        return fn

    return add(factory) if factory is not None else add


def make_env(name: str) -> Env:
    """A fresh environment for one trajectory."""
    factory = ENVIRONMENTS.get(name)
    if factory is None:
        raise ValueError(f"no environment named {name!r}; registered: {sorted(ENVIRONMENTS)} "
                         "(register one with rollout.envs.register_environment, or drop the row's `env`)")
    return factory()


def run_step(env: Env, row: Mapping[str, Any], trajectory: Sequence[tuple[str, str]], last_turn: str, *,
             timeout_s: float = 10.0, max_observation_chars: int = 4096) -> EnvStep:
    """One environment step that cannot take the run down: an exception becomes `env_error`, a step that
    outlives `timeout_s` becomes `env_timeout` (its thread is abandoned, as a daemon), and an observation longer
    than `max_observation_chars` becomes `env_flood`; each ends the trajectory with the reason in `info`."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["step"] = env.step(row, trajectory, last_turn)
        except BaseException as exc:  # noqa: BLE001 - an environment's failure is the trajectory's outcome
            box["error"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=call, name="mopd-env-step", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return EnvStep(None, outcome="env_timeout", info={"error": f"no answer within {timeout_s:g} s"})
    if "error" in box:
        return EnvStep(None, outcome="env_error", info={"error": box["error"]})
    step = box.get("step")
    if not isinstance(step, EnvStep):
        return EnvStep(None, outcome="env_error",
                       info={"error": f"step() returned {type(step).__name__}, not an EnvStep"})
    obs = step.observation
    if obs is not None and len(obs) > max_observation_chars:
        return EnvStep(None, outcome="env_flood",
                       info={"error": f"observation of {len(obs)} > {max_observation_chars} characters/tokens"})
    return step


# --- a calculator tool -------------------------------------------------------------------------------------
# The student writes `calc(<expression>)`; the environment answers `=<value>` and the student goes on. Integer
# + - * and parentheses-free expressions keep it safe (parsed with `ast`, never `eval`) and the stop string
# unambiguous. A malformed call is answered `=error`: a tool error is an observation the student must live
# with, not an environment failure.
CALL_OPEN, CALL_CLOSE = "calc(", ")"
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
MAX_CALC_DIGITS = 40


def turn_end(tokens: Sequence[int], stops: Sequence[str], tokenizer: Any, eos_ids: Sequence[int] = (),
             limit: int | None = None) -> tuple[int, str | None]:
    """Where a turn written as `tokens` ends, as vLLM ends it: after its first EOS, or after the token that
    completes one of `stops` in the detokenized new text (special tokens skipped; the stop string is kept), or at
    `limit` tokens. Returns (tokens kept, the stop string that ended it or None). For backends whose own generation
    cannot stop on strings (hf, a `vllm serve` request with more stop strings than the API takes)."""
    n = len(tokens) if limit is None else min(limit, len(tokens))
    for t in range(n):
        if tokens[t] in eos_ids:
            return t + 1, None
        hit = stop_in(tokens[:t + 1], stops, tokenizer)
        if hit is not None:
            return t + 1, hit
    return n, None


def stop_in(tokens: Sequence[int], stops: Sequence[str], tokenizer: Any) -> str | None:
    """The first of `stops` in the detokenized `tokens` (special tokens skipped, as vLLM's stop check), or None."""
    if not stops:
        return None
    text = tokenizer.decode(list(tokens), skip_special_tokens=True)
    return next((s for s in stops if s in text), None)


def calculate(expression: str) -> int:
    """The value of an integer expression of + - * (no parentheses, no other names)."""
    if len(expression) > 200 or "(" in expression:
        raise ValueError("expression too long or nested")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            value = _OPS[type(node.op)](ev(node.left), ev(node.right))
            if len(str(abs(value))) > MAX_CALC_DIGITS:
                raise ValueError("result too large")
            return value
        raise ValueError(f"not allowed in a calc expression: {ast.dump(node)[:40]}")

    return ev(ast.parse(expression.strip(), mode="eval").body)


class CalcEnv:
    """Answers `calc(a*b+c)` at the end of a turn with `=<value>`; a turn without a call ends the trajectory."""

    stop = (CALL_CLOSE,)

    def step(self, row: Mapping[str, Any], trajectory: Sequence[tuple[str, str]], last_turn: str) -> EnvStep:
        start = last_turn.rfind(CALL_OPEN)
        if start < 0 or not last_turn.endswith(CALL_CLOSE):
            return EnvStep(None)
        try:
            return EnvStep(f"={calculate(last_turn[start + len(CALL_OPEN):-len(CALL_CLOSE)])}",
                           info={"tool_call": 1})
        except (ValueError, SyntaxError, ZeroDivisionError):
            return EnvStep("=error", info={"tool_call": 1, "tool_error": 1})


register_environment("calc", CalcEnv)
