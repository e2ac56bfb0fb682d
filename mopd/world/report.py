"""The quickstart world's table: every model on every domain, as `mopd world build` prints it."""

from __future__ import annotations

from mopd.report import markdown_table
from mopd.world.tasks import SOLUTIONS, TOOL_ENVS


def plain_label(domain: str) -> str:
    """What a plain teacher of `domain` goes without: its tool, or its chain of thought."""
    return "no tool" if domain in TOOL_ENVS else "no chain" if domain in SOLUTIONS else "plain"


def world_table(info: dict) -> str:
    """Every model of the quickstart world on every domain (greedy exact match; rows with an environment rolled
    out against it), plus build time. A plain teacher (world.plain_teachers: trained on the bare answer, no tool
    or chain) is shown on its own domain only, under its domain's teacher."""
    domains = info["domains"]
    acc = info["accuracy"]
    names: list[tuple[str, str]] = []
    for d in domains:
        names.append((f"teacher/{d}", f"teacher/{d}"))
        if d in info.get("plain_teachers", ()):
            names.append((f"teacher/{d}-plain", f"teacher/{d} ({plain_label(d)})"))
    names.append(("student", "student"))
    rows = [[label, *[acc[name].get(d, "-") for d in domains]] for name, label in names]
    total = info.get("timings", {}).get("total", {}).get("wall_s", float("nan"))
    return (f"quickstart world in {info.get('dir', '')} (built in {total:.0f} s)\n\n"
            + markdown_table(["model", *domains], rows))


def plain_teacher_table(info: dict) -> str:
    """The world's plain teachers (no tool, no chain) beside its teachers, on their own domains, for the end of
    a training run: the run's table has the teachers the student learnt from; this row says what the tool or
    the chain is worth. Empty when the world has none."""
    plain = info.get("plain_teachers") or []
    if not plain:
        return ""
    acc = info["accuracy"]
    rows = [[d, acc[f"teacher/{d}"][d], acc[f"teacher/{d}-plain"][d], plain_label(d)] for d in plain]
    return ("world build's teachers (greedy, the world's own rollout loop) with and without their tool / chain\n\n"
            + markdown_table(["domain", "teacher", "teacher without", "without"], rows))
