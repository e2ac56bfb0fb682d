"""Outcome verifiers (the ORM signal and the eval accuracy) as a small registry.

A verifier maps (response text, reference answer) to a score in [0, 1]. Domains get one by registration
(`register_domain(domain, name)`: what a task suite such as the quickstart world does), a data row can
name one in its `verifier` field, and a row that has an `answer` but neither uses `exact_match`, so a new
domain is scored rather than silently left without an outcome.
"""

from __future__ import annotations

from collections.abc import Callable

Verifier = Callable[[str, str], float]

VERIFIERS: dict[str, Verifier] = {}
DOMAIN_VERIFIERS: dict[str, str] = {}  # domain -> verifier name
DEFAULT_VERIFIER = "exact_match"


def register_verifier(name: str, fn: Verifier) -> Verifier:
    """Add a verifier under `name` (re-registering the same function is a no-op, another one is refused)."""
    if VERIFIERS.get(name, fn) is not fn:
        raise ValueError(f"a different verifier is already registered as {name!r}")
    VERIFIERS[name] = fn
    return fn


def register_domain(domain: str, verifier: str) -> None:
    """Score rows of `domain` with the registered verifier `verifier`."""
    if verifier not in VERIFIERS:
        raise ValueError(f"no verifier named {verifier!r}; registered: {sorted(VERIFIERS)}")
    DOMAIN_VERIFIERS[domain] = verifier


def exact_match(response_text: str, answer: str) -> float:
    """1.0 iff the response, stripped of surrounding whitespace, is exactly the answer.

    Strict matching keeps the metric honest: a student that rambles past the answer is wrong even when
    the answer is a prefix of what it said.
    """
    return float(response_text.strip() == answer.strip())


register_verifier(DEFAULT_VERIFIER, exact_match)


def verifier_for(domain: str, name: str | None = None) -> Verifier:
    """The verifier a row uses: its own `verifier` field, else its domain's, else `exact_match`."""
    key = name or DOMAIN_VERIFIERS.get(domain, DEFAULT_VERIFIER)
    fn = VERIFIERS.get(key)
    if fn is None:
        raise ValueError(f"row of domain {domain!r} names verifier {key!r}, which is not registered; "
                         f"registered: {sorted(VERIFIERS)}")
    return fn


def verify(domain: str, response_text: str, answer: str, name: str | None = None) -> float:
    """Score `response_text` against `answer` with the verifier of `domain` (or the one named)."""
    return verifier_for(domain, name)(response_text, answer)
