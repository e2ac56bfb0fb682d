"""Health gates and the Plotly dashboard, on metrics files shaped like a real run's.

The gates are checked for what a user relies on: a healthy run passes, a violation names metric, step,
value and band, warm-up steps are exempt, and a mistyped rule is an error rather than a silently
disabled gate. The dashboard is checked twice: its Plotly figure specs in Python (bands, out-of-band
markers, log axes, which loss is shown), and the page in a real headless Chromium with networking off,
because "it wrote a file" proves nothing about charts drawn by script: the page reports
`ok:<panels drawn>/<panels>` in its title only after Plotly drew every panel without a script error.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from mopd.cli.stability import add_parsers
from stability.bands import DEFAULT_BANDS, Band
from stability.dashboard import Panel, dashboard_figures, load_runs, render_dashboard, render_html
from stability.gates import RulesError, Violation, check_run, load_rules, read_series

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("add", "rev", "sort")
STAGES = ("rollout", "teacher", "old_log_prob", "train", "sync", "step")
PROCS = ("trainer", "rollout", "teacher", "total")
R3 = ("r3/router_agreement", "r3/token_any_mismatch", "r3/replayed_frac")
ISM, ESS = "rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_eff_sample_size"


def train_row(step: int, r3: bool = True, pg: bool = False) -> dict:
    """One training step of a reverse-KL run (a PG run with `pg`) with every metric the design lists,
    healthy and smoothly varying. Teacher KL and the loss fall by more than two decades, as they do."""
    t = step / 10
    row: dict = {"step": step, "mopd/teacher_kl": 3.0 * math.exp(-step / 4) + 0.005}
    for i, d in enumerate(DOMAINS):
        row[f"mopd/teacher_kl/{d}"] = (1 + i) * math.exp(-t) + 0.05
        row[f"reward/{d}/acc"] = min(1.0, 0.2 * i + 0.03 * step)
        row[f"reward/{d}/mean"] = row[f"reward/{d}/acc"]
    row.update({f"rollout_corr/{k}": v for k, v in {
        "kl": 0.01 * math.sin(step), "k3_kl": 0.002 + 0.001 * math.cos(step), "chi2_token": 0.004,
        "chi2_seq": 0.03, "log_ppl_diff": -0.001 * t, "log_ppl_abs_diff": 0.001 * t + 0.002,
        "ppl_ratio": 1.0 + 0.001 * t, "training_ppl": 1.8 - 0.01 * t, "rollout_ppl": 1.81 - 0.01 * t,
        "extreme_token_frac@2": 0.001 * (step % 3), "rollout_is_mean": 1.0 + 0.02 * math.sin(step),
        "rollout_is_std": 0.05, "rollout_is_max": 1.6, "rollout_is_min": 0.6,
        "rollout_is_eff_sample_size": 0.95 - 0.005 * step, "rollout_is_oob_ratio": 0.002 * (step % 4)}.items()})
    row.update({
        "training/rollout_probs_diff_mean": 1e-3, "training/rollout_probs_diff_max": 0.02 + 0.001 * step,
        "actor/pg_loss": -2 * math.exp(-t) if pg else 0.0, "actor/grad_norm": 1.5 + math.sin(step),
        "actor/entropy": 3.0 - 0.02 * step, "actor/lr": 1e-3, "perf/tokens_per_s": 1500 + 10 * step,
        "response_length/mean": 12 + step % 5, "response_length/max": 32,
    })
    if not pg:
        row.update({"distillation/loss": 2.0 * math.exp(-step / 5) + 0.003, "distillation/reverse_kl": 0.5 / step,
                    "distillation/teacher_mass": 0.9, "distillation/nonfinite_frac": 0.0})
    row["actor/loss"] = row["actor/pg_loss"] if pg else row["distillation/loss"]  # the loss trained
    for i, s in enumerate(STAGES):
        row[f"timing_s/{s}"] = 0.05 * (i + 1)
    for i, p in enumerate(PROCS):
        row[f"perf/mem_gb/{p}"] = 6.0 if p == "total" else 1.0 + i
    if r3:
        row.update({"r3/router_agreement": 0.97, "r3/token_any_mismatch": 0.04, "r3/replayed_frac": 1.0})
    return row


def eval_row(step: int) -> dict:
    row: dict = {"step": step}
    for i, d in enumerate(DOMAINS):
        row[f"eval/{d}/acc"] = min(1.0, 0.25 * i + 0.02 * step)
        row[f"eval/{d}/rollout_teacher_kl"] = (1 + i) * math.exp(-step / 12)
    return row


def write_run(path: Path, rows: list[dict], r3: bool | None = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if r3 is not None:
        (path / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"r3": r3}}))
    return path


def healthy_rows(steps: int = 30, r3: bool = True, eval_every: int = 10, pg: bool = False) -> list[dict]:
    """Train lines, plus eval lines on their own line at step 0 and every `eval_every` steps (the same
    step then appears twice, as in a real run)."""
    rows = [eval_row(0)]
    for s in range(1, steps + 1):
        rows.append(train_row(s, r3, pg))
        if s % eval_every == 0:
            rows.append(eval_row(s))
    return rows


@pytest.fixture
def healthy_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "healthy", healthy_rows())


# ---------------------------------------------------------------------------------------------- reading

def test_read_series_merges_lines_and_keeps_non_finite(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", [{"step": 1, "a": 1.0}, {"step": 1, "eval/x/acc": 0.5},
                                     {"step": 2, "a": None}, {"step": 3, "a": 1e308, "note": "text"}])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "a": 0.')  # a line still being written by a live run
    s = read_series(run)
    assert s["eval/x/acc"] == [(1, 0.5)]
    assert [st for st, _ in s["a"]] == [1, 2, 3]
    assert math.isnan(s["a"][1][1]) and s["a"][2][1] == math.inf
    assert "note" not in s


# ---------------------------------------------------------------------------------------------- gates

def test_default_rules_file_matches_bands_and_passes_healthy_run(healthy_run: Path) -> None:
    rules = {r.metric: r for r in load_rules(REPO / "configs/gates/default.yaml")}
    for metric, band in DEFAULT_BANDS.items():
        assert rules[metric].band == band, f"configs/gates/default.yaml disagrees with bands.py on {metric}"
    assert check_run(healthy_run, REPO / "configs/gates/default.yaml") == []
    assert check_run(healthy_run, None) == []  # None = the built-in bands


def test_gates_fail_name_metric_step_value_and_band(tmp_path: Path) -> None:
    rows = healthy_rows(20)
    bad = {4: {"rollout_corr/kl": -0.5}, 7: {ISM: 3.0}, 9: {ESS: 0.1},
           5: {"mopd/teacher_kl": 9.0}, 12: {"mopd/teacher_kl": 6.0}, 3: {"actor/grad_norm": None}}
    for r in rows:
        if "actor/pg_loss" in r and r["step"] in bad:
            r.update(bad[r["step"]])
    run = write_run(tmp_path / "sick", rows)
    rules = {ISM: {"min": 0.5, "max": 2.0}, ESS: {"min": 0.3},
             "rollout_corr/kl": {"abs_max": 0.1}, "mopd/teacher_kl": {"max": 5, "after_step": 10},
             "actor/grad_norm": {}}
    got = check_run(run, rules)
    assert {(v.metric, v.step, v.reason) for v in got} == {
        ("rollout_corr/kl", 4, "out of band"), (ISM, 7, "out of band"),
        (ESS, 9, "out of band"), ("mopd/teacher_kl", 12, "out of band"),
        ("actor/grad_norm", 3, "non-finite")}  # step 5's teacher KL is inside the warm-up
    by = {v.metric: v for v in got}
    assert by[ISM] == Violation(ISM, 7, 3.0, "[0.5, 2]", "out of band")
    assert by["rollout_corr/kl"].band == "|x| <= 0.1"
    assert by["mopd/teacher_kl"].band == "<= 5 (after step 10)"
    assert str(by[ESS]) == "rollout_corr/rollout_is_eff_sample_size at step 9: 0.1 out of band, band >= 0.3"
    # allow_nan turns the NaN check off; a rules file on disk behaves like the mapping
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({**rules, "actor/grad_norm": {"allow_nan": True}}))
    assert {v.metric for v in check_run(run, tmp_path / "rules.yaml")} == {
        "rollout_corr/kl", ISM, ESS, "mopd/teacher_kl"}


def test_required_and_glob_rules(tmp_path: Path) -> None:
    run = write_run(tmp_path / "nor3", healthy_rows(10, r3=False))
    got = check_run(run, {"r3/router_agreement": {"min": 0.9, "required": True},
                          "eval/*/acc": {"min": 0.1}, "r3/replayed_frac": {"min": 0.5}})
    assert Violation("r3/router_agreement", None, None, ">= 0.9", "not logged") in got
    assert "not logged" in str(got[0])
    # eval/add/acc is 0.0 at step 0 and 0.2 at step 10; rev and sort start above 0.1
    assert [(v.metric, v.step) for v in got[1:]] == [("eval/add/acc", 0)]  # replayed_frac: skipped


@pytest.mark.parametrize("rules, match", [
    ({ISM: {"min": 0.5, "abs_min": 1}}, r"rollout_is_mean'.*unknown key.*'abs_min'.*allowed: min, max, abs_max"),
    ({ISM: [0.5, 2]}, r"'rollout_corr/rollout_is_mean' must be a mapping"),
    ({ISM: None}, r"'rollout_corr/rollout_is_mean' is empty"),
    ({ISM: {"min": 3, "max": 2}}, r"'rollout_corr/rollout_is_mean'.*min 3 is above max 2"),
    ({ISM: {"min": "low"}}, r"'rollout_corr/rollout_is_mean': min must be a number"),
    ({"x": {"after_step": 2.5}}, r"after_step must be an integer"),
    ({"x": {"required": "yes"}}, r"required must be true or false"),
    ({"x": {"abs_max": -1}}, r"abs_max must be >= 0"),
    ([1, 2], r"mapping of metric name"),
])
def test_bad_rules_are_clear_errors(healthy_run: Path, rules, match: str) -> None:
    with pytest.raises(RulesError, match=match):
        check_run(healthy_run, rules)


def test_bad_rules_files(tmp_path: Path, healthy_run: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    (tmp_path / "list.yaml").write_text("- rollout_corr/rollout_is_mean\n")
    (tmp_path / "broken.yaml").write_text("rollout_corr/rollout_is_mean: {min: [\n")
    (tmp_path / "sci.yaml").write_text("rollout_corr/kl: {abs_max: 1e-3}\n")  # YAML 1.1 reads 1e-3 as text
    for name, match in [("empty", "is empty"), ("list", "must be a mapping"), ("broken", "not valid YAML"),
                        ("missing", "not found")]:
        with pytest.raises(RulesError, match=match):
            check_run(healthy_run, tmp_path / f"{name}.yaml")
    assert load_rules(tmp_path / "sci.yaml")[0].band == Band(abs_max=0.001)


def _cli(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="mopd")
    add_parsers(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


def test_check_command_report_and_exit_codes(tmp_path: Path, healthy_run: Path, capsys) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rollout_corr/rollout_is_mean: {min: 0.5, max: 2.0}\nr3/nothing: {min: 0}\n")
    assert _cli(["check", str(healthy_run), "--rules", str(rules), "--no-strict"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "skipped (not logged)" in out
    assert _cli(["check", str(healthy_run), "--rules", str(rules)]) == 2  # strict: a rule checked nothing
    assert "r3/nothing" in capsys.readouterr().err

    rows = healthy_rows(12)
    for r in rows:
        if ISM in r:
            r[ISM] = 5.0
    sick = write_run(tmp_path / "sick", rows)
    assert _cli(["check", str(sick), "--rules", str(rules), "--max-per-metric", "2", "--no-strict"]) == 1
    out = capsys.readouterr().out
    assert "rollout_corr/rollout_is_mean at step 1: 5 out of band, band [0.5, 2]" in out
    assert "... and 10 more (steps 3-12)" in out and "FAIL: 12 violation(s) in 1 metric(s)" in out

    rules.write_text("rollout_corr/rollout_is_mean: {mn: 0.5}\n")
    assert _cli(["check", str(healthy_run), "--rules", str(rules)]) == 2
    assert "unknown key(s) 'mn'" in capsys.readouterr().err
    assert _cli(["check", str(tmp_path / "nope")]) == 2
    assert _cli(["check", str(healthy_run)]) == 0  # the shipped default rules


# ---------------------------------------------------------------------------------------------- figures

LISTED = [f"mopd/teacher_kl/{d}" for d in DOMAINS] + [f"eval/{d}/rollout_teacher_kl" for d in DOMAINS] + \
    [f"reward/{d}/acc" for d in DOMAINS] + [f"eval/{d}/acc" for d in DOMAINS] + ["mopd/teacher_kl"] + \
    [f"rollout_corr/{m}" for m in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff", "log_ppl_abs_diff",
                                   "ppl_ratio", "training_ppl", "rollout_ppl", "extreme_token_frac@2")] + \
    [f"rollout_corr/rollout_is_{m}" for m in ("mean", "std", "max", "min", "eff_sample_size", "oob_ratio")] + \
    ["training/rollout_probs_diff_mean", "training/rollout_probs_diff_max", *R3, "distillation/loss",
     "distillation/reverse_kl", "actor/grad_norm", "actor/entropy", "perf/tokens_per_s"] + \
    [f"timing_s/{s}" for s in STAGES] + [f"perf/mem_gb/{p}" for p in PROCS]


def panels_of(*runs: Path, bands=DEFAULT_BANDS) -> tuple[dict[str, Panel], list[str]]:
    panels, missing = dashboard_figures(load_runs(runs), bands)
    assert len({p.title for p in panels}) == len(panels)
    return {p.title: p for p in panels}, missing


def lines(p: Panel) -> dict[str, tuple]:
    """Trace name -> (x, y) of the curves (not the out-of-band markers)."""
    return {t.name: (t.x, t.y) for t in p.figure.data if t.name != "out of band"}


def test_every_logged_metric_has_a_panel_and_unlogged_panels_are_omitted(tmp_path: Path,
                                                                          healthy_run: Path) -> None:
    panels, missing = panels_of(healthy_run)
    drawn = {m for p in panels.values() for m in p.metrics}
    assert set(LISTED) <= drawn, f"logged metrics without a panel: {set(LISTED) - drawn}"
    assert all(p.figure.data for p in panels.values()) and missing == []
    assert lines(panels["Teacher KL · rev"]).keys() == {"train", "eval"}
    assert panels["Teacher KL · rev"].figure.data[1].line.dash == "dash"  # eval is dashed
    assert panels["Accuracy · add"].figure.layout.yaxis.range[1] >= 1.0

    nor3 = write_run(tmp_path / "nor3", healthy_rows(10, r3=False), r3=False)
    panels, missing = panels_of(nor3)
    assert not {m for p in panels.values() for m in p.metrics} & set(R3)
    assert missing == ["R3 router agreement", "R3 token mismatch / replayed"]
    assert "not logged: R3 router agreement, R3 token mismatch / replayed (R3 is off in the run config)" in \
        render_html(load_runs([nor3]))


def test_loss_panel_shows_the_loss_being_trained(tmp_path: Path, healthy_run: Path) -> None:
    """A reverse-KL run logs `actor/pg_loss` = 0: its panel is the distillation loss, not a flat zero."""
    panels, _ = panels_of(healthy_run)
    losses = [t for t, p in panels.items() if p.section == "Loss being trained"]
    assert losses == ["actor/loss", "distillation/loss", "distillation/nonfinite_frac", "distillation/reverse_kl",
                      "distillation/teacher_mass"]
    loss = panels["distillation/loss"].figure
    assert loss.layout.yaxis.type == "log" and loss.data[0].y[0] == pytest.approx(2.0 * math.exp(-0.2) + 0.003)

    rows = healthy_rows(10, pg=True)
    for r in rows:
        if "actor/pg_loss" in r:
            r["actor/sft_loss"] = 1.0 + 0.01 * r["step"]
    pg = write_run(tmp_path / "pg", rows)
    panels, _ = panels_of(pg)
    losses = [t for t, p in panels.items() if p.section == "Loss being trained"]
    assert losses == ["actor/loss", "actor/pg_loss", "actor/sft_loss"]
    pg_fig = panels["actor/pg_loss"].figure
    assert min(pg_fig.data[0].y) < 0 and pg_fig.layout.yaxis.type == "linear"
    # overlaid, the reverse-KL run draws no zero line in the PG run's loss panel
    panels, _ = panels_of(healthy_run, pg)
    assert [t.name for t in panels["actor/pg_loss"].figure.data] == ["pg"]
    assert [t.name for t in panels["distillation/loss"].figure.data] == ["healthy"]


def test_bands_shaded_and_out_of_band_points_marked(tmp_path: Path) -> None:
    rows = healthy_rows(30)
    bad = {8: {ISM: 2.6}, 9: {ESS: 0.1}, 5: {"mopd/teacher_kl": 9.0}, 12: {"mopd/teacher_kl": 6.0},
           6: {"actor/grad_norm": None}}
    for r in rows:
        if "actor/pg_loss" in r:
            r.update(bad.get(r["step"], {}))
    run = write_run(tmp_path / "sick", rows)
    bands = {**DEFAULT_BANDS, "mopd/teacher_kl": Band(max=5, after_step=10)}
    panels, _ = panels_of(run, bands=bands)

    def marks(title: str) -> list[tuple]:
        return [tuple(zip(t.x, t.y, strict=True)) for t in panels[title].figure.data if t.name == "out of band"]

    def band(title: str) -> tuple:
        s = panels[title].figure.layout.shapes[0]
        return s.type, s.x0, tuple(s.xref), s.y0, tuple(s.yref), s.y1, s.fillcolor

    green = "rgba(46,160,67,0.13)"
    assert band("IS weight mean") == ("rect", 0, ("x domain", "x domain"), 0.5, ("y", "y"), 2.0, green)
    assert band("IS effective sample size")[3:6] == (0.3, ("y", "y domain"), 1)  # ">= 0.3": open above
    assert band("rollout_corr/kl")[3:6] == (-0.1, ("y", "y"), 0.1)
    assert band("Teacher KL · all domains")[1:6] == (10, ("x", "x domain"), 0, ("y domain", "y"), 5)
    assert [s.y0 for s in panels["IS weight mean"].figure.layout.shapes[1:]] == [0.5, 2.0]  # dashed edges
    assert marks("IS weight mean") == [((8, 2.6),)]
    assert marks("IS effective sample size") == [((9, 0.1),)]
    assert marks("Teacher KL · all domains") == [((12, 6.0),)]  # step 5 is inside the warm-up
    assert marks("rollout_corr/kl") == [] and panels["rollout_corr/kl"].figure.layout.yaxis.range[0] < -0.1
    assert not panels["actor/grad_norm"].figure.layout.shapes  # no band, no shading

    # NaN: a gap in the line and a red "×" at its step
    gn = panels["actor/grad_norm"].figure
    assert math.isnan(gn.data[0].y[5]) and [(a.x, a.text) for a in gn.layout.annotations] == [(6, "×")]

    # the header's gate view agrees with the markers
    page = render_html(load_runs([run]), bands)
    assert page.count('class="bad">1 out of band') == 3 and 'class="ok">ok' in page


def test_log_axis_only_where_values_span_decades(healthy_run: Path) -> None:
    panels, _ = panels_of(healthy_run)
    kl = panels["Teacher KL · all domains"].figure.layout.yaxis
    assert kl.type == "log" and kl.range[0] < math.log10(0.006) < math.log10(2.3) < kl.range[1]
    for title in ("IS weight mean", "rollout_corr/kl", "actor/grad_norm", "Throughput (tokens/s)", "Accuracy · add"):
        assert panels[title].figure.layout.yaxis.type == "linear", title
    assert panels["IS effective sample size"].figure.layout.yaxis.range[0] < 0.3  # the band stays in view


def test_runs_overlay_one_colour_per_run(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a" / "run", healthy_rows(10))
    b = write_run(tmp_path / "b" / "run", healthy_rows(15, r3=False), r3=False)
    panels, missing = panels_of(a, b)
    ism = panels["IS weight mean"].figure
    assert [t.name for t in ism.data] == ["a/run", "b/run"] and len(ism.data[1].x) == 15
    assert ism.data[0].line.color != ism.data[1].line.color and ism.layout.showlegend
    assert [t.name for t in panels["R3 router agreement"].figure.data] == ["a/run"] and missing == []
    # timings and memory: one panel per stage/process, each with both runs
    assert "Stage timings (s)" not in panels and "timing_s/old_log_prob" in panels
    assert lines(panels["perf/mem_gb/total"]).keys() == {"a/run", "b/run"}
    assert lines(panels["Teacher KL · add"]).keys() == {"a/run · train", "a/run · eval", "b/run · train",
                                                        "b/run · eval"}


def test_render_writes_atomically_offline_and_escapes(tmp_path: Path, healthy_run: Path) -> None:
    out = render_dashboard([healthy_run], tmp_path / "out" / "dash.html")
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["dash.html"]  # no temp file left
    page = out.read_text()
    assert "<script src" not in page and "<link" not in page  # plotly.js is inlined, nothing fetched
    assert "Plotly.newPlot" in page and len(page) > 3_000_000

    with (healthy_run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 31, "actor/x</script><script>alert(1)</script>loss": 1.0}) + "\n")
    page = render_html(load_runs([healthy_run]))
    assert "<script>alert(1)" not in page and "alert(1)" in page
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        render_dashboard([tmp_path / "missing"], tmp_path / "x.html")

    # `mopd dashboard --rules`: a rules file's bands replace the defaults
    (tmp_path / "rules.yaml").write_text("actor/grad_norm: {max: 2}\n")
    assert _cli(["dashboard", str(healthy_run), "--out", str(tmp_path / "cli.html"), "--rules",
                 str(tmp_path / "rules.yaml")]) == 0
    page = (tmp_path / "cli.html").read_text()
    assert "actor/grad_norm &lt;= 2" in page and "rollout_is_mean [0.5, 2]" not in page


# ---------------------------------------------------------------------------------------------- browser

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Dom(HTMLParser):
    """Title, panels (`data-panel` -> `data-state`), Plotly's `main-svg` count and the error box."""

    def __init__(self) -> None:
        super().__init__()
        self.title, self.errors, self.panels, self.svgs, self.fills = "", "", {}, 0, set()
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.svgs += tag == "svg" and "main-svg" in (a.get("class") or "")
        self.fills.update(re.findall(r"fill: (rgb\([^)]*\))", a.get("style") or ""))
        if tag == "title" and not self.title:
            self._in = "title"
        elif a.get("id") == "errors":
            self._in = "errors"
        elif tag == "div" and "data-panel" in a:
            self.panels[a["data-panel"]] = a.get("data-state")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("title", "div"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in == "errors":
            self.errors += data


def _browse(html: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    assert exe
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--proxy-server=127.0.0.1:9",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=30000", *extra, html.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _dom(html: Path, tmp: Path) -> _Dom:
    res = _browse(html, tmp, "--dump-dom")
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-2000:]
    d = _Dom()
    d.feed(res.stdout)
    return d


@pytest.mark.skipif(_chromium() is None, reason="chromium not found on PATH: run scripts/install_chromium.sh "
                    "(Debian's chromium package) to enable the browser test of the dashboard")
def test_dashboard_draws_in_headless_chromium(tmp_path: Path) -> None:
    rows = healthy_rows(30)
    rows[5]["actor/grad_norm"] = None  # a NaN in the middle: a gap and a marker, not a script error
    rows[8][ISM] = 2.6                 # out of band: drawn red
    full = write_run(tmp_path / "full", rows)
    nor3 = write_run(tmp_path / "no_r3", healthy_rows(25, r3=False, eval_every=5, pg=True), r3=False)

    # one run with every metric: every panel drawn by Plotly, no script error, the red marker present
    page = render_dashboard([full], tmp_path / "full.html")
    d = _dom(page, tmp_path)
    n = len(dashboard_figures(load_runs([full]))[0])
    assert d.errors == "" and d.title == f"ok:{n}/{n}", (d.title, d.errors)
    assert len(d.panels) == n and set(d.panels.values()) == {"drawn"}, d.panels
    assert d.svgs >= 2 * n  # Plotly draws two main-svg layers per plot
    assert "rgb(207, 34, 46)" in d.fills  # the out-of-band marker

    # two runs overlaid (one without R3, one training a PG loss)
    d2 = _dom(render_dashboard([full, nor3], tmp_path / "two.html"), tmp_path)
    assert d2.errors == "" and re.fullmatch(r"ok:(\d+)/\1", d2.title) and d2.svgs >= 2 * len(d2.panels), d2.title

    # the title marker is not vacuous: a page whose drawing throws reports the error
    broken = re.sub(r'"id":"p0"', '"id":"nowhere"', page.read_text(), count=1)
    (tmp_path / "bad.html").write_text(broken)
    d3 = _dom(tmp_path / "bad.html", tmp_path)
    assert d3.title.startswith("error: ") and d3.errors, d3.title

    shot = tmp_path / "dashboard_screenshot.png"
    res = _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1400,2400")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    try:
        from PIL import Image
    except ImportError:
        pass
    else:
        with Image.open(shot) as im:  # plotted, not blank: many distinct colours (curves, bands, text)
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200
    if dest := os.environ.get("MOPD_DASHBOARD_SCREENSHOT"):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
