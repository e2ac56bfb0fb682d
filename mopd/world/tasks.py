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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rewards.verifiers import exact_match, register_domain, register_verifier

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


def gen_max(rng: random.Random) -> tuple[str, str]:
    """`max:5721=` -> `7`: one answer token, a cheap extra domain (the six-teacher world)."""
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    return f"max:{''.join(map(str, digits))}=", str(max(digits))


def gen_rot(rng: random.Random) -> tuple[str, str]:
    """`rot:abz=` -> `bca`: every letter shifted by one (z wraps to a), copy-like, a cheap extra domain."""
    s = _letters(rng)
    return f"rot:{s}=", "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)


GENERATORS: dict[str, Generator] = {"add": gen_add, "rev": gen_rev, "sort": gen_sort, "spell": gen_spell,
                                    "swap": gen_swap, "max": gen_max, "rot": gen_rot}
# Domains whose teacher writes a worked solution (prompt -> full response) rather than the bare answer.
SOLUTIONS: dict[str, Callable[[str], str]] = {"swap": swap_solution}

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
    register_domain(_domain, "world_final" if _domain in SOLUTIONS else "world_exact")


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
        rows.append(row)
    return rows


def sft_target(row: dict[str, Any]) -> dict[str, Any]:
    """The row as a teacher's SFT example: the response to learn is the worked solution when there is one."""
    return {**row, "answer": row.get("solution", row["answer"])}


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
