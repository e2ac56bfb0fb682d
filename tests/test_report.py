"""The result tables' headroom column: Open-MOPD's share of the gap to the teacher closed."""

from __future__ import annotations

import json
import math

import pytest

from mopd.compare import comparison_table, gather_results
from mopd.report import headroom_captured, result_table


def test_headroom_captured_hand_values():
    assert headroom_captured(0.2, 0.6, 1.0) == pytest.approx(0.5)
    assert headroom_captured(0.2, 1.0, 1.0) == pytest.approx(1.0)
    assert headroom_captured(0.5, 0.3, 0.9) == pytest.approx(-0.5)  # worse than before: negative
    assert math.isnan(headroom_captured(0.9, 0.95, 0.9))  # no gap to close


def test_tables_carry_the_headroom_column():
    res = {"experiment": "x", "objective": "reverse_kl", "steps": 3, "train_s": 1.0,
           "before": {"add": {"acc": 0.2, "teacher_kl": 1.0}}, "after": {"add": {"acc": 0.6, "teacher_kl": 0.5}},
           "teacher": {"add": 1.0}}
    for table in (result_table(res), comparison_table({"run": res})):
        header, row = [line for line in table.splitlines() if line.startswith("| ")][:2]
        cols = [c.strip() for c in header.split("|")[1:-1]]
        assert row.split("|")[1:-1][cols.index("headroom captured")].strip() == "0.500"


def test_compare_table_gathers_earlier_runs_of_the_same_budget(tmp_path):
    """`mopd compare --only B` prints B with the spec's other finished runs; a run of another budget is left out."""
    def result(name):
        return {"experiment": name, "objective": "sft", "steps": 1, "train_s": 1.0,
                "before": {"add": {"acc": 0.2, "teacher_kl": 1.0}}, "after": {"add": {"acc": 0.4, "teacher_kl": 0.5}},
                "teacher": {"add": 1.0}}
    for name, budget in (("a", 600), ("c", 120)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(result(name)))
        (tmp_path / name / "config.yaml").write_text(f"trainer:\n  max_wallclock_s: {budget}\n")
    lines: list[str] = []
    got = gather_results(tmp_path, ["a", "b", "c", "d"], {"b": result("b")}, 600, log=lines.append)
    assert list(got) == ["a", "b"]  # the spec's order; d never ran
    assert got["a"] == result("a")
    assert any("120" in line and "600" in line for line in lines)
