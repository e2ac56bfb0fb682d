"""How a failure reaches the user: one `mopd: error:` line carrying the message of the error that says what
to fix, wherever it was raised.

An error raised inside a Ray actor arrives wrapped: a `RayTaskError(ConfigError)` whose text is the remote
traceback with ANSI colour codes and the actor's repr. `error_chain` walks such wrappers (`RayTaskError.cause`)
and explicit `raise ... from` links (`__cause__`); the line shows the innermost project error's own message
(exit 2: bad input the user can fix), or else the error a Ray wrapper carries as `Type: first line` and where it
was raised (exit 1), never a repr and never colour codes. `--debug` prints the chain and re-raises for the whole
traceback.

Ray is not imported here (`mopd config show` must start instantly): a Ray error can only exist once Ray was
imported, so its class is looked up in `sys.modules`.
"""

from __future__ import annotations

import errno
import re
import sys

# Errors the project raises itself (bad config, data, rows, teachers, run dirs, rules, a diverged run) say
# what to fix: exit 2. Everything else (a crashed actor, a full disk) is exit 1, still one line.
PROJECT = ("mopd", "teachers", "rollout", "rewards", "stability")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def is_project_error(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] in PROJECT


def _ray_cause(e: BaseException) -> BaseException | None:
    rex = sys.modules.get("ray.exceptions")
    if rex is not None and isinstance(e, rex.RayTaskError):
        cause = vars(e).get("cause")  # the dual class forwards unknown attributes to the cause itself
        return cause if isinstance(cause, BaseException) else None
    return None


def error_chain(e: BaseException) -> list[BaseException]:
    """`e`, then what it wraps (a Ray task error's cause, an explicit `__cause__`), outermost first."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = _ray_cause(cur) or cur.__cause__
    return chain


_TASK = re.compile(r"ray::([\w.]+)\(")


def _where(chain: list[BaseException]) -> str:
    """' (in Actor.method)' for an error raised in a Ray actor or task, else ''. The wrapper `ray.get` raises
    keeps only its text, whose first line is `ray::Actor.method() (pid=..., repr=...)`."""
    for e in chain:
        if _ray_cause(e) is None:
            continue
        fn = vars(e).get("function_name")
        if not isinstance(fn, str) or not fn:
            m = _TASK.search(strip_ansi(str(e)).lstrip().split("\n", 1)[0])
            fn = m.group(1) if m else ""
        if fn:
            return f" (in {fn.removeprefix('ray::')})"
    return ""


def error_line(e: BaseException) -> tuple[str, int]:
    """The message for `mopd: error: ...` and the exit code (2: a project error somewhere in the chain)."""
    chain = error_chain(e)
    project = [x for x in chain if is_project_error(x)]
    if project:
        return strip_ansi(str(project[-1])), 2
    inner = e  # the first error that is not a Ray wrapper: an explicit `raise X(...) from err` keeps its message
    while (cause := _ray_cause(inner)) is not None:
        inner = cause
    if isinstance(inner, OSError) and inner.strerror:
        msg = f"{inner.strerror}: {inner.filename}" if inner.filename else inner.strerror
        if inner.errno == errno.ENOSPC:
            msg += " (free some space; finished steps and checkpoints already written are intact)"
        return strip_ansi(msg), 1
    lines = [ln for ln in strip_ansi(str(inner)).strip().splitlines() if ln.strip()]
    first = lines[0].strip()[:300] if lines else ""
    return f"{type(inner).__name__}: {first}{_where(chain)} (run with --debug for the traceback)", 1


def describe_chain(e: BaseException) -> str:
    """One line per link of the chain (for --debug), outermost first."""
    out = []
    for i, x in enumerate(error_chain(e)):
        lines = strip_ansi(str(x)).strip().splitlines()
        text = lines[0][:200] if lines and _ray_cause(x) is None else "(wrapper)"
        out.append(f"  {'  ' * i}{type(x).__module__}.{type(x).__name__}: {text}")
    return "\n".join(out)
