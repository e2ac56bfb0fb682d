"""Synthetic domains of the quickstart world and the JSONL rows built from them.

Each domain is a generator `(rng) -> (prompt, answer)` over plain text, short enough that a tiny
character-level model learns it in about a minute on two CPU cores. The domains differ in difficulty on
purpose (addition needs carries, reversal and sorting are copy-like), so one student warm-start leaves
different amounts of room per domain, which is what a multi-teacher table needs to show.

A reasoning domain also has a worked solution (`SOLUTIONS`): the response its teacher is trained to write,
a long chain of thought that ends in `|` and the answer. Its rows carry it as `solution`; `answer` stays the
final answer, which is all its verifier reads.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rewards.verifiers import exact_match, register_domain, register_verifier
from rollout.envs import CALL_CLOSE, CALL_OPEN, ENV, STUDENT, make_env, run_step

Generator = Callable[[random.Random], tuple[str, str]]

DIGITS = 2  # addition operands are zero-padded to DIGITS digits, the sum to DIGITS + 1
MIN_LETTERS, MAX_LETTERS = 3, 7  # reversal / sorting strings


def gen_add(rng: random.Random) -> tuple[str, str]:
    """`add:45+07=` -> `052`.

    Fixed width keeps every digit column at a fixed offset from the answer digit it feeds, which a small
    causal model learns several times faster than unpadded sums. Measured here with the default teacher
    (batch 64, lr 2e-3): unpadded 1-3 digit operands 10% after 900 steps; fixed-width 3 digits 90%
    after 600; fixed-width 2 digits 97% after 400. Carries still make it the slowest domain to learn,
    and carry-free sums give a half-trained student partial credit.
    """
    a, b = rng.randrange(10**DIGITS), rng.randrange(10**DIGITS)
    return f"add:{a:0{DIGITS}d}+{b:0{DIGITS}d}=", f"{a + b:0{DIGITS + 1}d}"


def _letters(rng: random.Random) -> str:
    n = rng.randint(MIN_LETTERS, MAX_LETTERS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def gen_rev(rng: random.Random) -> tuple[str, str]:
    """`rev:abcd=` -> `dcba`."""
    s = _letters(rng)
    return f"rev:{s}=", s[::-1]


def gen_sort(rng: random.Random) -> tuple[str, str]:
    """`sort:dbca=` -> `abcd`.

    Letters are distinct: with repeats the model must also count, which took a small teacher well over
    500 steps to pass 80% here; distinct letters keep sorting a one-minute task.
    """
    s = "".join(rng.sample(string.ascii_lowercase, rng.randint(MIN_LETTERS, MAX_LETTERS)))
    return f"sort:{s}=", "".join(sorted(s))


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_SPELL, MAX_SPELL = 3, 6  # digits to spell


def gen_spell(rng: random.Random) -> tuple[str, str]:
    """`spell:4059=` -> `four zero five nine`.

    The long-answer domain (12-29 characters, so 13-30 tokens with EOS, against 4-8 for the others): a
    lookup plus a copy, easy for a teacher, but a per-token loss spreads each sample over many more tokens,
    which is what makes the short and the long domains compete unevenly (Open-MOPD's imbalance). Only in
    worlds that list it (`configs/quickstart_4domain.yaml`); the quickstart's three domains are unchanged.
    """
    digits = [rng.randrange(10) for _ in range(rng.randint(MIN_SPELL, MAX_SPELL))]
    return f"spell:{''.join(map(str, digits))}=", " ".join(DIGIT_WORDS[d] for d in digits)


SWAP_ITEMS = "abcde"  # the objects whose arrangement is tracked
SWAP_STEPS = 8  # swaps per problem
FINAL = "|"  # a worked solution's last mark: the final answer follows it


def swap_tape(state: str, swaps: list[str], done: int) -> str:
    """The swap list with the arrangement in parentheses after the first `done` swaps: `ab,(cdeab),ce,...`."""
    return ",".join([*swaps[:done], f"({state})", *swaps[done:]])


def apply_swap(state: str, swap: str) -> str:
    """Exchange the places of the two objects named by `swap` (`"ce"`: where c was e goes, and back)."""
    x, y = swap
    return "".join(y if c == x else x if c == y else c for c in state)


def gen_swap(rng: random.Random) -> tuple[str, str]:
    """`swap:(deabc),dc,eb,...=` -> the arrangement after the SWAP_STEPS swaps (`dbace`).

    The reasoning domain: tracking shuffled objects (BIG-bench's tracking_shuffled_objects) over five objects
    and eight swaps, a composition in the permutation group S5 that a tiny model does not learn to do in one
    forward pass: trained on the answer alone the world's teacher stays at chance (1.0% after 400 and after
    2000 steps; 1/120 is chance). Written out step by step (`swap_solution`) it is a fixed-format chain of
    261 characters that the same teacher learns to 100% in 400 steps (`benchmarks/reason_trace.py`).
    """
    state = "".join(rng.sample(SWAP_ITEMS, len(SWAP_ITEMS)))
    swaps = ["".join(rng.sample(SWAP_ITEMS, 2)) for _ in range(SWAP_STEPS)]
    final = state
    for sw in swaps:
        final = apply_swap(final, sw)
    return f"swap:{swap_tape(state, swaps, 0)}=", final


def swap_solution(prompt: str) -> str:
    """The worked solution of a `swap` prompt: after every swap the whole tape again, with the arrangement
    moved past the swap just applied and updated, then `|` and the final arrangement.

        swap:(deabc),dc,eb,...=  ->  dc,(ceabd),eb,... dc,eb,(cdabe),... ... dc,eb,...,(dbace)|dbace

    Every step has the same width, so each character of it is computed from characters a fixed distance
    back: the same place one step earlier (copies), the arrangement one step earlier and the swap that
    followed it. Carrying the swaps along is what makes a long chain learnable: the arrangements alone
    (`(ceabd) (dbaec) ...|dbace`, 69 characters, step t finding swap t in the prompt) are learnt too (0.945
    after 400 steps) but are no long response, and a chain of the tape's length made of arrangements alone (32
    swaps, step t reading up to ~100 characters back) was at 2% after 300 steps where the tape was at 100%
    after 250 (one scratch run each, same model, lr and batch).
    """
    body = prompt.removeprefix("swap:").removesuffix("=")
    cells = body.split(",")
    state, swaps = cells[0].strip("()"), cells[1:]
    tapes = []
    for t, sw in enumerate(swaps, 1):
        state = apply_swap(state, sw)
        tapes.append(swap_tape(state, swaps, t))
    return " ".join(tapes) + FINAL + state


CARRY_DIGITS = 4  # operands of the `carry` domain
CARRY_PAD = "."  # a consumed digit (operands) or a sum digit not yet written


def gen_carry(rng: random.Random) -> tuple[str, str]:
    """`carry:8317+7264=` -> `15581` (CARRY_DIGITS-digit operands, the sum zero-padded to one more).

    The agentic world's long-reasoning domain: addition written column by column (`carry_solution`), a chain of
    101 characters before the answer, every character of which is copied from a fixed distance back or is the
    sum of three digits written just before it, so the student can learn it from its own samples within
    minutes (the `swap` chain, which composes eight permutations, stayed at 0.005 after 300 MOPD steps).
    """
    a, b = rng.randrange(10**CARRY_DIGITS), rng.randrange(10**CARRY_DIGITS)
    return f"carry:{a:0{CARRY_DIGITS}d}+{b:0{CARRY_DIGITS}d}=", f"{a + b:0{CARRY_DIGITS + 1}d}"


def carry_solution(prompt: str) -> str:
    """The worked solution of a `carry` prompt: one fixed-width state per column, then `|` and the sum.

        carry:8317+7264=  ->  .831+.726,7+4+0=11,1... ..83+..72,1+6+1=08,81.. ...8+...7,3+2+0=05,581.
                              ....+....,8+7+0=15,5581|15581

    A state is `A+B,a+b+c=cd,S`: the operands with the column just added shifted out (`.` in front), that
    column written out (its two digits, the carry into it, their two-digit sum: the carry out and the digit)
    and the sum digits so far, the newest first, so that after the last column `c` and `S` read the sum. Every
    state is as wide as the last and each of its characters is a copy from a fixed distance back or a sum of
    three digits written just before it: a chain a tiny causal model learns from its own samples within
    minutes, where the same addition answered in one go (or written as states without the column) is learnt
    far more slowly.
    """
    x, y = prompt.removeprefix("carry:").removesuffix("=").split("+")
    n = len(x)
    carry, digits, states = 0, "", []
    for i in range(1, n + 1):
        a, b = int(x[-i]), int(y[-i])
        s = a + b + carry
        column = f"{a}+{b}+{carry}={s:02d}"
        carry, digits = s // 10, str(s % 10) + digits
        states.append(f"{CARRY_PAD * i}{x[:-i]}+{CARRY_PAD * i}{y[:-i]},{column},{digits}{CARRY_PAD * (n - i)}")
    return " ".join(states) + FINAL + f"{carry}{digits}"


MUL_MIN_DIGITS, MUL_MAX_DIGITS = 3, 4  # operands of the `mul` tool domain
TOOL_ENVS: dict[str, str] = {"mul": "calc"}  # tool domains and the environment (rollout.envs) their rows name


def gen_mul(rng: random.Random) -> tuple[str, str]:
    """`mul:347*829=` -> `287663` (3-4 digit operands).

    The tool domain: a product of two 3-4 digit numbers, which a tiny model does not compute in one forward
    pass (its teacher trained on the bare answer scores near 0), while with the `calc` tool it is a copy: the
    teacher writes `calc(347*829)`, the environment answers `=287663`, the teacher writes `|287663` (the
    verifier reads what follows the last `|`). `tool_turns` builds that trajectory with the real environment.
    """
    a, b = (rng.randrange(10 ** (k - 1), 10**k) for k in (rng.randint(MUL_MIN_DIGITS, MUL_MAX_DIGITS),
                                                         rng.randint(MUL_MIN_DIGITS, MUL_MAX_DIGITS)))
    return f"mul:{a}*{b}=", str(a * b)


def tool_turns(domain: str, prompt: str, answer: str) -> list[list[str]]:
    """The teacher's tool-using trajectory for a prompt of a tool domain, as (author, text) pieces: the call,
    the observation the real environment returns for it (rollout.envs.run_step), and the final answer.

    The observation is whatever the environment says (so a change in the tool shows up in the data, not
    silently papered over); the final answer is the row's, so a tool that answered wrongly is caught here.
    """
    env_name = TOOL_ENVS[domain]
    call = f"{CALL_OPEN}{prompt.split(':', 1)[1].removesuffix('=')}{CALL_CLOSE}"
    step = run_step(make_env(env_name), {"prompt": prompt, "answer": answer, "env": env_name}, [], call)
    if step.done or not isinstance(step.observation, str) or step.observation != f"={answer}":
        raise ValueError(f"environment {env_name!r} answered {step.observation!r} ({step.outcome}) to {call!r}; "
                         f"the {domain} rows expect ={answer}")
    return [[STUDENT, call], [ENV, step.observation], [STUDENT, FINAL + answer]]


def gen_max(rng: random.Random) -> tuple[str, str]:
    """`max:5721=` -> `7`: one answer token, a cheap extra domain (the six-teacher world)."""
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    return f"max:{''.join(map(str, digits))}=", str(max(digits))


def gen_rot(rng: random.Random) -> tuple[str, str]:
    """`rot:abz=` -> `bca`: every letter shifted by one (z wraps to a), copy-like, a cheap extra domain."""
    s = _letters(rng)
    return f"rot:{s}=", "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)


GENERATORS: dict[str, Generator] = {"add": gen_add, "rev": gen_rev, "sort": gen_sort, "spell": gen_spell,
                                    "swap": gen_swap, "carry": gen_carry, "mul": gen_mul, "max": gen_max,
                                    "rot": gen_rot}
# Domains whose teacher writes a worked solution (prompt -> full response) rather than the bare answer.
SOLUTIONS: dict[str, Callable[[str], str]] = {"swap": swap_solution, "carry": carry_solution}

EOS = "<eos>"


def answer_before_eos(response_text: str, answer: str) -> float:
    """Exact match of what comes before the first `<eos>`: transformers' `generate` (used while building
    the world) keeps writing after it, the engines stop there."""
    return exact_match(response_text.split(EOS, 1)[0], answer)


def final_answer(response_text: str) -> str:
    """What a response answers: the text after its last `|` (all of it when there is none), before `<eos>`."""
    return response_text.split(EOS, 1)[0].rsplit(FINAL, 1)[-1]


def final_answer_match(response_text: str, answer: str) -> float:
    """Exact match of the final answer of a worked solution; the chain of thought before it is not scored."""
    return exact_match(final_answer(response_text), answer)


# The world's domains are scored by its own verifiers wherever rows of them are verified.
register_verifier("world_exact", answer_before_eos)
register_verifier("world_final", final_answer_match)
for _domain in GENERATORS:
    register_domain(_domain, "world_final" if _domain in SOLUTIONS or _domain in TOOL_ENVS else "world_exact")


def get_generator(domain: str) -> Generator:
    if domain not in GENERATORS:
        raise ValueError(f"unknown domain {domain!r}; known domains: {sorted(GENERATORS)}")
    return GENERATORS[domain]


def make_rows(domain: str, n: int, split: str, seed: int, exclude: set[str] | None = None,
              ) -> list[dict[str, Any]]:
    """`n` distinct rows of one domain, none of whose prompts is in `exclude`; rows of a reasoning domain
    (`SOLUTIONS`) also carry their worked `solution` and their `verifier` (`world_final`).

    The RNG is seeded from a string so that each (seed, domain, split) stream is independent of the
    others and of Python's hash randomisation: the same config always writes byte-identical files.
    """
    gen = get_generator(domain)
    rng = random.Random(f"mopd-world/{seed}/{domain}/{split}")
    seen = set(exclude or ())
    rows: list[dict[str, Any]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"domain {domain!r}: cannot draw {n} distinct {split} prompts")
        prompt, answer = gen(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        row = {"id": f"{domain}-{split}-{len(rows):05d}", "prompt": prompt, "domain": domain, "answer": answer}
        if domain in SOLUTIONS:
            # The row names its verifier: a process that has not registered it fails loudly rather than
            # scoring the whole chain of thought against the answer (always 0).
            row.update(solution=SOLUTIONS[domain](prompt), verifier="world_final")
        if domain in TOOL_ENVS:
            # The row names its environment (the rollout runs it between the student's turns) and carries the
            # teacher's trajectory; the final answer follows the last `|`, as for a worked solution.
            row.update(env=TOOL_ENVS[domain], turns=tool_turns(domain, prompt, answer), verifier="world_final")
        rows.append(row)
    return rows


def sft_target(row: dict[str, Any], plain: bool = False) -> dict[str, Any]:
    """The row as a teacher's SFT example: the response to learn is the worked solution when there is one, the
    tool-using trajectory (`turns`, whose observations the SFT loss masks) when there is one. `plain`: the bare
    answer, no chain and no tool (the teachers the world table compares against)."""
    if plain:
        return {k: v for k, v in row.items() if k not in ("solution", "turns")}
    if "turns" in row:
        return {**row, "answer": trajectory_text(row["turns"])}
    return {**row, "answer": row.get("solution", row["answer"])}


def trajectory_text(turns: Iterable[Sequence[str]]) -> str:
    """The response text of a trajectory: its pieces (student turns and observations) in order."""
    return "".join(text for _, text in turns)


def make_splits(domains: Iterable[str], train_per_domain: int, eval_per_domain: int, seed: int,
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval rows for every domain; eval prompts never appear in train."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for d in domains:
        ev = make_rows(d, eval_per_domain, "eval", seed)
        evals += ev
        train += make_rows(d, train_per_domain, "train", seed, exclude={r["prompt"] for r in ev})
    return train, evals


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
