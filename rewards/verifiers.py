"""Exact outcome verifiers for the quickstart domains (the ORM signal and the eval metric).

A response counts only if, after cutting at the end-of-sequence token and stripping whitespace, it is
exactly the reference answer. Strict matching keeps the metric honest: a student that rambles past the
answer without emitting eos is wrong even when the answer is a prefix of what it said.
"""

from __future__ import annotations

from collections.abc import Callable

EOS = "<eos>"


def _clean(text: str) -> str:
    return text.split(EOS, 1)[0].strip()


def verify_add(response_text: str, answer: str) -> float:
    return float(_clean(response_text) == answer.strip())


def verify_rev(response_text: str, answer: str) -> float:
    return float(_clean(response_text) == answer.strip())


def verify_sort(response_text: str, answer: str) -> float:
    return float(_clean(response_text) == answer.strip())


VERIFIERS: dict[str, Callable[[str, str], float]] = {
    "add": verify_add,
    "rev": verify_rev,
    "sort": verify_sort,
}


def verify(domain: str, response_text: str, answer: str) -> float:
    """1.0 if `response_text` is exactly `answer` for `domain`, else 0.0."""
    fn = VERIFIERS.get(domain)
    if fn is None:
        raise ValueError(f"no verifier for domain {domain!r}; known domains: {sorted(VERIFIERS)}")
    return fn(response_text, answer)
