"""Health gates and the HTML dashboard, on hand-written metrics files.

The gates are checked for what a user relies on: a healthy run passes, a violation names metric, step,
value and band, warm-up steps are exempt, and a mistyped rule is an error rather than a silently
disabled gate. The dashboard is opened in a real headless Chromium with networking off, because "it
rendered a file" proves nothing about a page whose charts are drawn by script: the page reports
`ok:<panels with data>/<panels>` in its title only after drawing without a script error.
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

from stability.bands import DEFAULT_BANDS, Band
from stability.cli_commands import add_parsers
from stability.dashboard import NO_DATA, build_payload, load_runs, render_dashboard, render_html
from stability.gates import RulesError, Violation, check_run, load_rules, read_series

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("add", "rev", "sort")
STAGES = ("rollout", "teacher", "reference", "train", "sync", "step")
R3 = ("r3/router_agreement", "r3/token_any_mismatch", "r3/replayed_frac")


def train_row(step: int, r3: bool = True) -> dict:
    """Every train metric the design reference lists, with healthy, smoothly varying values."""
    t = step / 10
    row: dict = {"step": step, "mopd/teacher_kl": 2.5 * math.exp(-t)}
    for i, d in enumerate(DOMAINS):
        row[f"mopd/teacher_kl/{d}"] = (1 + i) * math.exp(-t) + 0.05
        row[f"reward/{d}/acc"] = min(1.0, 0.2 * i + 0.03 * step)
        row[f"reward/{d}/mean"] = row[f"reward/{d}/acc"]
    row.update({
        "rollout_corr/kl": 0.01 * math.sin(step), "rollout_corr/k3_kl": 0.002 + 0.001 * math.cos(step),
        "rollout_corr/chi2_token": 0.004, "rollout_corr/log_ppl_diff": -0.001 * t,
        "rollout_corr/ppl_ratio": 1.0 + 0.001 * t, "rollout_corr/probs_diff_mean": 1e-3,
        "rollout_corr/probs_diff_max": 0.02 + 0.001 * step, "rollout_corr/extreme_token_frac@2": 0.001 * (step % 3),
        "icepop/masked_frac": 0.002 * (step % 4), "is/mean": 1.0 + 0.02 * math.sin(step),
        "is/eff_sample_size": 0.95 - 0.005 * step,
        "actor/pg_loss": -2 * math.exp(-t), "actor/kl_loss": 0.0, "actor/grad_norm": 1.5 + math.sin(step),
        "actor/entropy": 3.0 - 0.02 * step, "actor/lr": 1e-3, "perf/tokens_per_s": 1500 + 10 * step,
    })
    for i, s in enumerate(STAGES):
        row[f"timing_s/{s}"] = 0.05 * (i + 1)
    if r3:
        row.update({"r3/router_agreement": 0.97, "r3/token_any_mismatch": 0.04, "r3/replayed_frac": 1.0})
    return row


def eval_row(step: int) -> dict:
    row: dict = {"step": step}
    for i, d in enumerate(DOMAINS):
        row[f"eval/{d}/acc"] = min(1.0, 0.25 * i + 0.02 * step)
        row[f"eval/{d}/teacher_kl"] = (1 + i) * math.exp(-step / 12)
    return row


def write_run(path: Path, rows: list[dict], r3: bool | None = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if r3 is not None:
        (path / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"r3": r3}}))
    return path


def healthy_rows(steps: int = 30, r3: bool = True, eval_every: int = 10) -> list[dict]:
    """Train lines, plus eval lines on their own line at step 0 and every `eval_every` steps (the same
    step then appears twice, as in a real run)."""
    rows = [eval_row(0)]
    for s in range(1, steps + 1):
        rows.append(train_row(s, r3))
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
    bad = {4: {"rollout_corr/kl": -0.5}, 7: {"is/mean": 3.0}, 9: {"is/eff_sample_size": 0.1},
           5: {"mopd/teacher_kl": 9.0}, 12: {"mopd/teacher_kl": 6.0}, 3: {"actor/grad_norm": None}}
    for r in rows:
        if "actor/pg_loss" in r and r["step"] in bad:
            r.update(bad[r["step"]])
    run = write_run(tmp_path / "sick", rows)
    rules = {"is/mean": {"min": 0.5, "max": 2.0}, "is/eff_sample_size": {"min": 0.3},
             "rollout_corr/kl": {"abs_max": 0.1}, "mopd/teacher_kl": {"max": 5, "after_step": 10},
             "actor/grad_norm": {}}
    got = check_run(run, rules)
    assert {(v.metric, v.step, v.reason) for v in got} == {
        ("rollout_corr/kl", 4, "out of band"), ("is/mean", 7, "out of band"),
        ("is/eff_sample_size", 9, "out of band"), ("mopd/teacher_kl", 12, "out of band"),
        ("actor/grad_norm", 3, "non-finite")}  # step 5's teacher KL is inside the warm-up
    by = {v.metric: v for v in got}
    assert by["is/mean"] == Violation("is/mean", 7, 3.0, "[0.5, 2]", "out of band")
    assert by["rollout_corr/kl"].band == "|x| <= 0.1"
    assert by["mopd/teacher_kl"].band == "<= 5 (after step 10)"
    assert str(by["is/eff_sample_size"]) == "is/eff_sample_size at step 9: 0.1 out of band, band >= 0.3"
    # allow_nan turns the NaN check off; a rules file on disk behaves like the mapping
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({**rules, "actor/grad_norm": {"allow_nan": True}}))
    assert {v.metric for v in check_run(run, tmp_path / "rules.yaml")} == {
        "rollout_corr/kl", "is/mean", "is/eff_sample_size", "mopd/teacher_kl"}


def test_required_and_glob_rules(tmp_path: Path) -> None:
    run = write_run(tmp_path / "nor3", healthy_rows(10, r3=False))
    got = check_run(run, {"r3/router_agreement": {"min": 0.9, "required": True},
                          "eval/*/acc": {"min": 0.1}, "r3/replayed_frac": {"min": 0.5}})
    assert Violation("r3/router_agreement", None, None, ">= 0.9", "not logged") in got
    assert "not logged" in str(got[0])
    # eval/add/acc is 0.0 at step 0 and 0.2 at step 10; rev and sort start above 0.1
    assert [(v.metric, v.step) for v in got[1:]] == [("eval/add/acc", 0)]  # replayed_frac: skipped


@pytest.mark.parametrize("rules, match", [
    ({"is/mean": {"min": 0.5, "abs_min": 1}}, r"'is/mean'.*unknown key.*'abs_min'.*allowed: min, max, abs_max"),
    ({"is/mean": [0.5, 2]}, r"'is/mean' must be a mapping"),
    ({"is/mean": None}, r"'is/mean' is empty"),
    ({"is/mean": {"min": 3, "max": 2}}, r"'is/mean'.*min 3 is above max 2"),
    ({"is/mean": {"min": "low"}}, r"'is/mean': min must be a number"),
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
    (tmp_path / "list.yaml").write_text("- is/mean\n")
    (tmp_path / "broken.yaml").write_text("is/mean: {min: [\n")
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
    rules.write_text("is/mean: {min: 0.5, max: 2.0}\nr3/nothing: {min: 0}\n")
    assert _cli(["check", str(healthy_run), "--rules", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "skipped (not logged)" in out

    rows = healthy_rows(12)
    for r in rows:
        if "is/mean" in r:
            r["is/mean"] = 5.0
    sick = write_run(tmp_path / "sick", rows)
    assert _cli(["check", str(sick), "--rules", str(rules), "--max-per-metric", "2"]) == 1
    out = capsys.readouterr().out
    assert "is/mean at step 1: 5 out of band, band [0.5, 2]" in out
    assert "... and 10 more (steps 3-12)" in out and "FAIL: 12 violation(s) in 1 metric(s)" in out

    rules.write_text("is/mean: {mn: 0.5}\n")
    assert _cli(["check", str(healthy_run), "--rules", str(rules)]) == 2
    assert "unknown key(s) 'mn'" in capsys.readouterr().err
    assert _cli(["check", str(tmp_path / "nope")]) == 2
    assert _cli(["check", str(healthy_run)]) == 0  # the shipped default rules


# ---------------------------------------------------------------------------------------------- dashboard

LISTED = [f"mopd/teacher_kl/{d}" for d in DOMAINS] + [f"eval/{d}/teacher_kl" for d in DOMAINS] + \
    [f"reward/{d}/acc" for d in DOMAINS] + [f"eval/{d}/acc" for d in DOMAINS] + \
    [f"rollout_corr/{m}" for m in ("kl", "k3_kl", "chi2_token", "log_ppl_diff", "ppl_ratio", "probs_diff_mean",
                                   "probs_diff_max", "extreme_token_frac@2")] + \
    ["icepop/masked_frac", "is/mean", "is/eff_sample_size", *R3, "actor/grad_norm", "actor/entropy"] + \
    [f"timing_s/{s}" for s in STAGES]


def test_dashboard_payload_panels(tmp_path: Path, healthy_run: Path) -> None:
    payload = build_payload(load_runs([healthy_run]))
    drawn = {t["metric"] for p in payload["panels"] for t in p["traces"]}
    assert set(LISTED) <= drawn, f"listed metrics without a panel: {set(LISTED) - drawn}"
    assert all(p["traces"] for p in payload["panels"]), [p["title"] for p in payload["panels"] if not p["traces"]]
    bands = {p["title"]: p["band"] for p in payload["panels"]}
    assert bands["IS weight mean"]["desc"] == "[0.5, 2]" and bands["IS effective sample size"]["lo"] == 0.3
    assert bands["rollout_corr/kl"] == {"lo": -0.1, "hi": 0.1, "after": None, "desc": "|x| <= 0.1"}

    # R3 off: only the R3 panels are empty, and they say why
    nor3 = write_run(tmp_path / "nor3", healthy_rows(10, r3=False), r3=False)
    empty = [p for p in build_payload(load_runs([nor3]))["panels"] if not p["traces"]]
    assert {m for p in empty for m in p["metrics"]} == set(R3)
    assert all(p["empty"].startswith(NO_DATA) and "R3 is off" in p["empty"] for p in empty)

    # two runs overlaid: one trace per run, labelled by run dir name; same-named dirs disambiguated
    a = write_run(tmp_path / "a" / "run", healthy_rows(10))
    b = write_run(tmp_path / "b" / "run", healthy_rows(15, r3=False), r3=False)
    two = build_payload(load_runs([a, b]))
    ism = next(p for p in two["panels"] if p["title"] == "IS weight mean")
    assert [t["label"] for t in ism["traces"]] == ["a/run", "b/run"] and [t["color"] for t in ism["traces"]] == [0, 1]


def test_render_writes_atomically_and_escapes(tmp_path: Path, healthy_run: Path) -> None:
    out = render_dashboard([healthy_run], tmp_path / "out" / "dash.html")
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["dash.html"]  # no temp file left
    html = out.read_text()
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) <= {"http://www.w3.org/2000/svg"}  # nothing fetched
    payload = build_payload(load_runs([healthy_run]))
    payload["runs"][0]["name"] = "</script><script>alert(1)</script>"
    assert "</script><script>alert(1)" not in render_html(payload)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        render_dashboard([tmp_path / "missing"], tmp_path / "x.html")


# ---------------------------------------------------------------------------------------------- browser

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Dom(HTMLParser):
    """Title, panels (`data-panel` -> `data-state`), empty-panel messages and the error box."""

    def __init__(self) -> None:
        super().__init__()
        self.title, self.errors, self.panels, self.nodata = "", "", {}, []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "title" and not self.title:
            self._in = "title"
        elif a.get("id") == "errors":
            self._in = "errors"
        elif tag == "div" and "data-panel" in a:
            self.panels[a["data-panel"]] = a.get("data-state")
        elif tag == "div" and a.get("class") == "nodata":
            self._in = "nodata"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("title", "div"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in == "errors":
            self.errors += data
        elif self._in == "nodata":
            self.nodata.append(data)


def _browse(html: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    assert exe
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--proxy-server=127.0.0.1:9",
           "--host-resolver-rules=MAP * ~NOTFOUND", *extra, html.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=45)


def _dom(html: Path, tmp: Path) -> _Dom:
    res = _browse(html, tmp, "--dump-dom")
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-2000:]
    d = _Dom()
    d.feed(res.stdout)
    return d


@pytest.mark.skipif(_chromium() is None, reason="chromium not found on PATH: run scripts/install_chromium.sh "
                    "(Debian's chromium package) to enable the browser test of the dashboard")
def test_dashboard_opens_in_headless_chromium(tmp_path: Path, healthy_run: Path) -> None:
    nor3 = write_run(tmp_path / "no_r3", healthy_rows(25, r3=False, eval_every=5), r3=False)
    rows = healthy_rows(30)
    rows[5]["actor/grad_norm"] = None  # a NaN in the middle: a gap and a marker, not a script error
    rows[8]["is/mean"] = 2.6           # out of band: drawn red
    full = write_run(tmp_path / "full", rows)

    # one run with every metric: every panel drawn, no script error
    page = render_dashboard([full], tmp_path / "full.html")
    d = _dom(page, tmp_path)
    n = len(build_payload(load_runs([full]))["panels"])
    assert d.errors == "" and d.title == f"ok:{n}/{n}", (d.title, d.errors)
    assert len(d.panels) == n and set(d.panels.values()) == {"data"}, d.panels

    # several runs overlaid, one without R3: still every panel has data (from the run that logged it)
    page2 = render_dashboard([full, nor3], tmp_path / "two.html")
    d2 = _dom(page2, tmp_path)
    assert d2.errors == "" and re.fullmatch(r"ok:(\d+)/\1", d2.title), d2.title

    # R3 off everywhere: exactly the R3 panels say "no data (metric not logged)"
    page3 = render_dashboard([nor3], tmp_path / "nor3.html")
    d3 = _dom(page3, tmp_path)
    empty = sorted(k for k, v in d3.panels.items() if v == "empty")
    assert d3.errors == "" and empty == ["R3 router agreement", "R3 token mismatch / replayed"], d3.panels
    assert d3.title == f"ok:{len(d3.panels) - 2}/{len(d3.panels)}"
    assert all(NO_DATA in t for t in d3.nodata) and len(d3.nodata) == 2

    # the title marker is not vacuous: a page whose drawing throws reports the error
    bad = build_payload(load_runs([nor3]))
    bad["panels"][0]["traces"] = [{"x": None}]
    (tmp_path / "bad.html").write_text(render_html(bad))
    d4 = _dom(tmp_path / "bad.html", tmp_path)
    assert d4.title.startswith("error: ") and d4.errors, d4.title

    shot = tmp_path / "dashboard_screenshot.png"
    res = _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1400,2400")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if dest := os.environ.get("MOPD_DASHBOARD_SCREENSHOT"):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
