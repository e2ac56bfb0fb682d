"""The quickstart world's table: every model on every domain, as `mopd world build` prints it."""

from __future__ import annotations

from mopd.report import markdown_table


def world_table(info: dict) -> str:
    """Every model of the quickstart world on every domain (greedy exact match), plus build time."""
    domains = info["domains"]
    acc = info["accuracy"]
    rows = [[name, *[acc[name][d] for d in domains]] for name in [*(f"teacher/{d}" for d in domains), "student"]]
    total = info.get("timings", {}).get("total", {}).get("wall_s", float("nan"))
    return (f"quickstart world in {info.get('dir', '')} (built in {total:.0f} s)\n\n"
            + markdown_table(["model", *domains], rows))
