"""Training-health dashboard: one HTML file for one or several runs, drawn with Plotly.

Plotly rather than a hand-written renderer: zoom, hover, legend toggles and log axes come for free, and
the page stays a single file that opens offline (air-gapped clusters, CI artifacts, a file mailed
around) because plotly.js is inlined, never fetched from a CDN. Several runs are overlaid, one colour
per run, labelled by run directory name, so an ablation reads at a glance.

A panel appears only when some run logged one of its metrics; the header lists the standard panels
that had nothing to draw, so a missing metric reads as missing rather than as a flat line. Health
bands (`stability.bands`, or a rules file's) are shaded behind their metric and points outside them
are marked red, using the same `Band.applies`/`Band.contains` the gates use, so "red on the dashboard"
and "fails `mopd check`" cannot disagree. Loss panels are built from the loss keys the run actually
logged: a reverse-KL run's `actor/pg_loss` is a constant 0 and is left out rather than shown as the
loss being trained.

After drawing, the page sets `document.title` to `ok:<panels drawn>/<panels>` (or `error: ...` on a
script error) and marks each panel `data-state="drawn"`; the browser test reads these from the DOM.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import html
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs

from stability.bands import DEFAULT_BANDS, Band
from stability.gates import Rule, Series, Skipped, check_series, read_series_checked

PALETTE = qualitative.D3
OUT_OF_BAND = "#cf222e"
BAND_FILL = "rgba(46,160,67,0.13)"
BAND_EDGE = "#2da44e"
EVAL_DASH = "dash"
#: A panel whose positive values span more than this factor gets a log y axis (KL, losses early on).
LOG_SPAN = 100.0
#: Timing stages in pipeline order; any other `timing_s/*` key follows them.
STAGES = ("rollout", "wait_rollout", "teacher", "wait_teacher", "old_log_prob", "train", "sync", "other", "step")


@dataclass
class RunData:
    name: str
    path: Path
    series: Series
    config: dict[str, Any]
    skipped: Skipped | None = None  # what its metrics.jsonl held that could not be drawn (said on the page)


@dataclass(frozen=True)
class Curve:
    metric: str
    label: str
    dash: str = "solid"


@dataclass
class Panel:
    """One chart. `split`: with several runs, draw one panel per curve instead, because six timing
    stages times N runs in one frame is unreadable (with one run they read fine together)."""

    title: str
    section: str
    curves: list[Curve]
    yfix: tuple[float, float] | None = None
    wide: bool = False
    split: bool = False
    band: Band | None = None
    optional: bool = False  # not listed as "not logged" when empty (PG-only metrics, glob-built panels)
    figure: go.Figure = field(default_factory=go.Figure)

    @property
    def metrics(self) -> list[str]:
        return [c.metric for c in self.curves]


# ---------------------------------------------------------------------------------------------- loading

def _read_config(run_dir: Path) -> dict[str, Any]:
    """`RUN_DIR/config.yaml` if readable; a damaged config must not stop the dashboard."""
    p = run_dir / "config.yaml"
    try:
        import yaml

        data = yaml.safe_load(p.read_text()) if p.is_file() else {}
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _run_names(paths: list[Path]) -> list[str]:
    """Directory names, widened with parent folders only where two runs would share a label."""
    names = [p.name or str(p) for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 6:
        depth += 1
        names = ["/".join(p.parts[-depth:]) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def load_runs(run_dirs: Iterable[str | Path]) -> list[RunData]:
    """Every run's metrics and config. Raises FileNotFoundError naming a dir without metrics."""
    paths = [Path(d).resolve() for d in run_dirs]
    runs = []
    for n, p in zip(_run_names(paths), paths, strict=True):
        series, skipped = read_series_checked(p)
        runs.append(RunData(name=n, path=p, series=series, config=_read_config(p), skipped=skipped or None))
    return runs


# ---------------------------------------------------------------------------------------------- panels

def _domains(names: Iterable[str]) -> list[str]:
    pats = [r"^mopd/teacher_kl/([^/]+)$", r"^reward/([^/]+)/(acc|mean)$", r"^eval/([^/]+)/(acc|rollout_teacher_kl)$"]
    return sorted({m.group(1) for n in names for p in pats if (m := re.match(p, n))})


def _is_loss(name: str) -> bool:
    return "loss" in name and name.startswith(("actor/", "distillation/"))


def _points(run: RunData, metric: str) -> list[tuple[int, float]]:
    """What to draw of `metric` for `run`. A loss that is exactly 0 wherever logged is a term this
    objective does not train (a reverse-KL run's `actor/pg_loss`): drawing it would pass a flat zero
    off as the loss, so it is treated as not logged."""
    pts = run.series.get(metric, [])
    return [] if _is_loss(metric) and all(v == 0.0 for _, v in pts) else pts


def _specs(runs: list[RunData]) -> list[Panel]:
    """Every panel these runs could fill, curves not yet filtered by what was logged."""
    names = sorted({n for r in runs for n in r.series})

    def glob(*pats: str) -> list[str]:
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]

    def one(section: str, metric: str, title: str | None = None, **kw: Any) -> Panel:
        return Panel(title or metric, section, [Curve(metric, metric.rsplit("/", 1)[-1])], **kw)

    panels: list[Panel] = []
    sec = "Distillation per domain"
    panels.append(one(sec, "mopd/teacher_kl", "Teacher KL · all domains"))
    doms = _domains(names)
    for d in doms:
        panels.append(Panel(f"Teacher KL · {d}", sec, [
            Curve(f"mopd/teacher_kl/{d}", "train"), Curve(f"eval/{d}/rollout_teacher_kl", "eval", EVAL_DASH)]))
    for d in doms:
        panels.append(Panel(f"Accuracy · {d}", sec, [
            Curve(f"reward/{d}/acc", "train reward"), Curve(f"eval/{d}/acc", "eval", EVAL_DASH)], yfix=(0, 1)))

    sec = "Loss being trained"
    panels += [one(sec, n, optional=True) for n in glob("actor/*loss*", "distillation/*loss*")]
    panels += [one(sec, n) for n in glob("distillation/*") if not _is_loss(n)]

    sec = "Rollout / trainer mismatch"
    for m in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff", "log_ppl_abs_diff", "ppl_ratio"):
        panels.append(one(sec, f"rollout_corr/{m}"))
    panels.append(Panel("Perplexity: trainer vs rollout", sec, [
        Curve("rollout_corr/training_ppl", "trainer"), Curve("rollout_corr/rollout_ppl", "rollout", EVAL_DASH)]))
    panels.append(one(sec, "training/rollout_probs_diff_mean"))
    panels.append(one(sec, "training/rollout_probs_diff_max"))

    sec = "Off-policy correction"
    panels.append(one(sec, "rollout_corr/rollout_is_mean", "IS weight mean"))
    panels.append(one(sec, "rollout_corr/rollout_is_eff_sample_size", "IS effective sample size"))
    panels.append(one(sec, "rollout_corr/rollout_is_oob_ratio", "IcePop masked fraction"))
    panels.append(Panel("IS weight spread", sec, [
        Curve(f"rollout_corr/rollout_is_{s}", s) for s in ("max", "std", "min")], split=True))

    sec = "Routing replay (R3) and extreme tokens"
    fixed = ["r3/router_agreement", "r3/token_any_mismatch", "r3/replayed_frac"]
    panels.append(one(sec, fixed[0], "R3 router agreement"))
    panels.append(Panel("R3 token mismatch / replayed", sec, [
        Curve(fixed[1], "token_any_mismatch"), Curve(fixed[2], "replayed_frac")], split=True))
    panels += [one(sec, n) for n in glob("r3/*") if n not in fixed]
    panels.append(one(sec, "rollout_corr/extreme_token_frac@2", "Extreme-token fraction (ratio > 2)"))

    sec = "Optimisation"
    for m in ("grad_norm", "entropy", "lr", "pg_clipfrac", "ppo_kl"):
        panels.append(one(sec, f"actor/{m}", optional=m in ("pg_clipfrac", "ppo_kl")))
    panels.append(Panel("Response length", sec, [
        Curve("response_length/mean", "mean"), Curve("response_length/max", "max", EVAL_DASH)]))
    panels.append(Panel("Advantage", sec, [Curve(n, n.rsplit("/", 1)[-1]) for n in glob("mopd/advantage/*")],
                        optional=True))

    sec = "Multi-turn rollouts"  # runs whose rows name an environment (mopd/multiturn.py); else not drawn
    panels.append(Panel("Turns per trajectory", sec, [Curve("rollout/turns_mean", "mean"),
                                                      Curve("rollout/turns_max", "max", EVAL_DASH)], optional=True))
    panels.append(one(sec, "rollout/tool_calls_mean", "Tool calls per trajectory", optional=True))
    panels.append(Panel("Environment failures (share of trajectories)", sec, [
        Curve(f"rollout/{o}", o) for o in ("env_error", "env_timeout", "env_flood")], optional=True))
    panels.append(Panel("Trajectory ended by a limit (share)", sec, [
        Curve(f"rollout/{o}", o) for o in ("max_turns", "max_total_tokens")], optional=True))
    panels.append(one(sec, "rollout/obs_token_share", "Observation-token share", optional=True))
    turns = sorted(glob("mopd/teacher_kl_turn/*"), key=lambda n: int(n.rsplit("/", 1)[-1]))
    panels.append(Panel("Teacher KL per turn", sec, [Curve(n, "turn " + n.rsplit("/", 1)[-1]) for n in turns],
                        optional=True))
    panels.append(Panel("Response length distribution (tokens, observations included)", sec, [
        Curve(f"rollout/response_length/{q}", q) for q in ("min", "p50", "mean", "p90", "max")], optional=True))

    sec = "Speed and memory"
    panels.append(one(sec, "perf/tokens_per_s", "Throughput (tokens/s)"))
    # Per-teacher accounting (teachers/accounting.py): each teacher's share of the scored tokens and its engine's
    # scoring seconds, and a teacher pool's swaps; the stage panel keeps the stages only.
    panels.append(Panel("Teacher token share", sec, [Curve(n, n.split("/")[1]) for n in glob("teacher/*/token_share")],
                        wide=True, optional=True))
    panels.append(Panel("Teacher scoring (s)", sec, [Curve(n, n.split("/")[-1]) for n in glob("timing_s/teacher/*")],
                        wide=True, optional=True))
    panels.append(Panel("Teacher sample staleness (policy versions)", sec,
                        [Curve(n, n.split("/")[1]) for n in glob("teacher/*/staleness_mean")], wide=True, optional=True))
    panels.append(Panel("Teacher pool swaps", sec, [Curve(n, n) for n in glob("pool/swaps", "timing_s/pool_swap")],
                        optional=True))
    panels.append(Panel("Teacher pool hit rate (no swap)", sec,
                        [Curve(n, n.split("/")[1]) for n in glob("pool/*/hit_rate")], yfix=(0, 1), optional=True))
    for pool in sorted({n.split("/")[1] for n in glob("pool/*/resident/*")}):  # which teacher each pool holds
        panels.append(Panel(f"Teacher pool residency · {pool}", sec, [
            Curve(n, n.rsplit("/", 1)[-1]) for n in glob(f"pool/{pool}/resident/*")], yfix=(0, 1), wide=True,
            split=True, optional=True))
    timing = [n for n in glob("timing_s/*") if not n.startswith(("timing_s/teacher/", "timing_s/pool_swap"))]
    timing.sort(key=lambda n: (STAGES.index(n[9:]) if n[9:] in STAGES else len(STAGES), n))
    panels.append(Panel("Stage timings (s)", sec, [Curve(n, n[9:]) for n in timing], wide=True, split=True,
                        optional=True))
    mem = sorted(glob("perf/mem_gb/*"), key=lambda n: (n == "perf/mem_gb/total", n))
    panels.append(Panel("Memory (GB) per process and total", sec, [Curve(n, n[12:]) for n in mem],
                        wide=True, split=True, optional=True))
    return panels


def _band_for(metrics: list[str], bands: Mapping[str, Band]) -> Band | None:
    """The band for the first metric that has one: exact names win over globs (`eval/*/acc`)."""
    for m in metrics:
        if m in bands and bands[m].bounded:
            return bands[m]
    for m in metrics:
        for pat, b in bands.items():
            if b.bounded and any(c in pat for c in "*?[") and fnmatch.fnmatchcase(m, pat):
                return b
    return None


# ---------------------------------------------------------------------------------------------- figures

def _values(vals: Iterable[float]) -> np.ndarray:
    """NaN (also for +-inf) leaves a gap in the line. A numpy array because Plotly validates plain
    lists element by element, which made a long run's dashboard take seconds; arrays go into the page
    as compact base64 typed arrays."""
    y = np.fromiter(vals, dtype=np.float64)
    y[~np.isfinite(y)] = np.nan
    return y


def _y_axis(values: list[float], p: Panel) -> dict[str, Any]:
    """Log when every value is positive and they span decades (not for fixed-range panels such as
    accuracy, read against 0 and 1); the range always shows the band."""
    if not values:
        return {}
    lo, hi = min(values), max(values)
    log = p.yfix is None and lo > 0 and hi / lo > LOG_SPAN
    for v in (p.yfix or ()) + (p.band.limits() if p.band else ()):
        if v is not None and (not log or v > 0):
            lo, hi = min(lo, v), max(hi, v)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if lo == hi:
        lo, hi = lo - (abs(lo) * 0.1 or 1), hi + (abs(hi) * 0.1 or 1)
    pad = (hi - lo) * 0.06
    return {"type": "log" if log else "linear", "range": [lo - pad, hi + pad]}


def _band_shapes(b: Band, log: bool) -> list[dict[str, Any]]:
    """Shaded band plus dotted edges. An open side or a missing warm-up is pinned to the plot's edge
    (`domain` coordinates), so the shading still reaches the border after any zoom; so is a bound at
    or below 0 on a log axis, which has no such value."""
    lo, hi = b.limits()
    lo = None if log and lo is not None and lo <= 0 else lo
    x0, xref0 = (b.after_step, "x") if b.after_step is not None else (0, "x domain")
    y0, yref0 = (lo, "y") if lo is not None else (0, "y domain")
    y1, yref1 = (hi, "y") if hi is not None else (1, "y domain")
    shapes = [dict(type="rect", layer="below", line_width=0, fillcolor=BAND_FILL, x0=x0, x1=1, y0=y0, y1=y1,
                   xref=[xref0, "x domain"], yref=[yref0, yref1])]
    for v in (lo, hi):
        if v is not None:
            shapes.append(dict(type="line", layer="below", line=dict(color=BAND_EDGE, width=1, dash="dot"),
                               x0=x0, x1=1, y0=v, y1=v, xref=[xref0, "x domain"], yref="y"))
    return shapes


def _figure(p: Panel, runs: list[RunData], bands: Mapping[str, Band]) -> go.Figure:
    multi = len(runs) > 1
    traces: list[go.Scatter] = []
    marks: list[go.Scatter] = []
    notes: list[dict[str, Any]] = []
    finite: list[float] = []
    for ri, run in enumerate(runs):
        for ci, c in enumerate(p.curves):
            pts = _points(run, c.metric)
            if not pts:
                continue
            name = (run.name if multi else c.metric) if len(p.curves) == 1 else \
                (f"{run.name} · {c.label}" if multi else c.label)
            color = PALETTE[(ri if multi else ci) % len(PALETTE)]
            x, y = np.array([s for s, _ in pts]), _values(v for _, v in pts)
            finite += y[np.isfinite(y)].tolist()
            traces.append(go.Scatter(
                x=x, y=y, name=name, mode="lines+markers" if len(pts) <= 40 else "lines",
                line=dict(color=color, dash=c.dash, width=1.6), marker=dict(size=4, color=color),
                legendgroup=run.name if multi else None, hovertemplate="%{y:.5g}"))
            band = _band_for([c.metric], bands)
            bad = [(s, v) for s, v in pts if band and band.applies(s) and math.isfinite(v) and not band.contains(v)]
            if band and bad:
                marks.append(go.Scatter(
                    x=np.array([s for s, _ in bad]), y=_values(v for _, v in bad), mode="markers", name="out of band",
                    legendgroup="out of band", showlegend=not marks,
                    marker=dict(color=OUT_OF_BAND, size=8, line=dict(color="white", width=1)),
                    hovertemplate=f"{html.escape(name)} outside {band.describe()}: %{{y:.5g}}<extra></extra>"))
            notes += [dict(x=s, y=0, xref="x", yref="y domain", text="×", showarrow=False, yanchor="bottom",
                           font=dict(color=OUT_OF_BAND, size=14), hovertext=f"{name}: {v} at step {s}")
                      for s, v in pts if not math.isfinite(v)]
    if traces and not finite:
        notes.append(dict(x=0.5, y=0.5, xref="x domain", yref="y domain", showarrow=False,
                          text="no finite values (NaN/inf only)", font=dict(color=OUT_OF_BAND)))
    sub = f'<br><span style="font-size:10px;color:#57606a">health band: {p.band.describe()}</span>' if p.band else ""
    n_legend = len(traces) + (1 if marks else 0)
    grid = dict(gridcolor="#eaeef2", zeroline=False, showline=True, linecolor="#d0d7de", mirror=True)
    yaxis = _y_axis(finite, p)
    return go.Figure(data=traces + marks, layout=dict(
        template="none", title=dict(text=html.escape(p.title) + sub, x=0.01, xanchor="left", font_size=13),
        margin=dict(l=58, r=12, t=48 if sub else 34, b=36), hovermode="x unified", font_size=11,
        showlegend=n_legend > 1, legend=dict(orientation="h", y=-0.16, yanchor="top", font_size=10),
        xaxis=dict(title=dict(text="step", standoff=4), **grid),
        yaxis=dict(yaxis, exponentformat="e", **grid),
        shapes=_band_shapes(p.band, yaxis.get("type") == "log") if p.band else [], annotations=notes))


def dashboard_figures(runs: list[RunData], bands: Mapping[str, Band] = DEFAULT_BANDS
                      ) -> tuple[list[Panel], list[str]]:
    """The panels to draw, each with its Plotly figure, and the titles of standard panels no run
    logged (shown in the header instead of as empty frames)."""
    drawn: list[Panel] = []
    missing: list[str] = []
    for spec in _specs(runs):
        spec.curves = [c for c in spec.curves if any(_points(r, c.metric) for r in runs)]
        if not spec.curves:
            missing += [] if spec.optional else [spec.title]
            continue
        parts = [spec]
        if len(runs) > 1 and spec.split and len(spec.curves) > 1:
            parts = [Panel(c.metric, spec.section, [c], spec.yfix) for c in spec.curves]
        for p in parts:
            p.band = _band_for(p.metrics, bands)
            p.figure = _figure(p, runs, bands)
            drawn.append(p)
    if not _domains(n for r in runs for n in r.series):
        missing += ["Teacher KL per domain", "Accuracy per domain"]
    return drawn, missing


# ---------------------------------------------------------------------------------------------- page

def _summary(runs: list[RunData], bands: Mapping[str, Band]) -> str:
    """Per run: steps logged and, per banded metric, how many values left the band (the gate view)."""
    rules = [Rule(metric=m, band=b) for m, b in bands.items()]
    head = ["run", "steps", "last step", "wall s"] + [f"{r.metric} {r.band.describe()}" for r in rules]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for i, run in enumerate(runs):
        names = sorted(run.series)
        steps = sorted({s for pts in run.series.values() for s, _ in pts})
        viol = check_series(run.series, rules)
        wall = sum(v for _, v in run.series.get("timing_s/step", []) if math.isfinite(v))
        color = PALETTE[i % len(PALETTE)] if len(runs) > 1 else "#1f2328"
        cells = [f'<span style="color:{color}">■</span> {html.escape(run.name)}', str(len(steps)),
                 str(steps[-1]) if steps else "-", f"{wall:.1f}"]
        for r in rules:
            if not (matched := r.matches(names)):
                cells.append('<span class="na">not logged</span>')
                continue
            n = sum(1 for v in viol if v.band == r.band.describe() and v.metric in matched)
            cells.append('<span class="ok">ok</span>' if n == 0 else f'<span class="bad">{n} out of band</span>')
        rows.append(f'<tr title="{html.escape(str(run.path))}">' + "".join(f"<td>{c}</td>" for c in cells)
                    + "</tr>")
    return '<table class="runs">' + "".join(rows) + "</table>"


_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:14px 18px;color:#1f2328;background:#f6f8fa;font-size:13px}
h1{font-size:19px;margin:0 0 4px}
h2{font-size:15px;margin:14px 0 6px;color:#444;border-bottom:1px solid #d0d7de;padding-bottom:2px}
.meta{color:#57606a;font-size:12px;margin:3px 0}
table.runs{border-collapse:collapse;margin:6px 0;font-size:12px;background:#fff}
table.runs td,table.runs th{border:1px solid #d0d7de;padding:2px 7px;text-align:left}
.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:bold}.na{color:#8c959f}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:8px}
.panel{background:#fff;border:1px solid #d0d7de;border-radius:5px;height:300px}
.panel.wide{grid-column:span 2}
#errors{color:#cf222e;white-space:pre-wrap;font-family:monospace}
"""

# Installed before plotly.js, so an error anywhere (library, data, drawing) lands in the title.
_ERROR_JS = """
window.__errors = [];
function __fail(msg){
  window.__errors.push(String(msg));
  document.title = 'error: ' + window.__errors[0];
  var e = document.getElementById('errors'); if (e) e.textContent = window.__errors.join('\\n');
}
window.addEventListener('error', function(ev){ __fail(ev.message); });
window.addEventListener('unhandledrejection', function(ev){ __fail(ev.reason); });
"""

_DRAW_JS = """
(function(){
  var figs = JSON.parse(document.getElementById('mopd-figures').textContent);
  var cfg = {displaylogo: false, responsive: true, typesetMath: false,
             modeBarButtonsToRemove: ['select2d', 'lasso2d', 'toggleSpikelines']};
  Promise.all(figs.map(function(f){
    var el = document.getElementById(f.id);
    return Plotly.newPlot(el, f.fig.data, f.fig.layout, cfg).then(function(){ el.dataset.state = 'drawn'; });
  })).then(function(){
    if (!window.__errors.length) document.title = 'ok:' + figs.length + '/' + figs.length;
  }, __fail);
})();
"""


def render_html(runs: list[RunData], bands: Mapping[str, Band] = DEFAULT_BANDS) -> str:
    """The complete page, plotly.js inlined. Figures go in a JSON block with `<` escaped, so no run
    name or metric can close the script tag."""
    panels, missing = dashboard_figures(runs, bands)
    body, figs, section = [], [], None
    for i, p in enumerate(panels):
        if p.section != section:
            body.append(("</div>" if section else "") + f"<h2>{html.escape(p.section)}</h2><div class=grid>")
            section = p.section
        body.append(f'<div id="p{i}" class="panel{" wide" if p.wide else ""}" data-panel="{html.escape(p.title)}"'
                    f' data-state="pending"></div>')
        figs.append(f'{{"id":"p{i}","fig":{pio.to_json(p.figure, validate=False, engine="json")}}}')
    body.append("</div>" if section else "<p>No metrics logged yet.</p>")
    title = "mopd dashboard · " + ", ".join(r.name for r in runs)
    r3_off = [r for r in runs if (r.config.get("algorithm") or {}).get("r3") is False]
    note = " (R3 is off in the run config)" if r3_off and len(r3_off) == len(runs) else ""
    meta = [f"generated {_dt.datetime.now().isoformat(timespec='seconds')} · {len(runs)} run(s) · "
            "shaded: health band, red: outside it, ×: NaN/inf · drag to zoom, double-click to reset, "
            "click a legend entry to hide it"]
    if missing:
        meta.append("not logged: " + ", ".join(missing) + note)
    bad = [f'<div class="meta bad">{html.escape(r.name)}: {html.escape(r.skipped.describe())}</div>'
           for r in runs if r.skipped]
    data = ("[" + ",".join(figs) + "]").replace("<", "\\u003c")
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n',
        f"<title>{html.escape(title)} (rendering)</title>\n<style>{_CSS}</style>\n",
        f"<script>{_ERROR_JS}</script>\n<script>{get_plotlyjs()}</script>\n</head><body>\n",
        f'<h1>{html.escape(title)}</h1><div id="errors"></div>\n',
        "".join(f'<div class="meta">{html.escape(m)}</div>' for m in meta), *bad, _summary(runs, bands), "\n",
        "\n".join(body), "\n",
        f'<script type="application/json" id="mopd-figures">{data}</script>\n',
        f"<script>{_DRAW_JS}</script>\n</body></html>\n",
    ])


def _write_atomic(out: Path, text: str) -> None:
    """Temp file in the same folder, then `os.replace`: a viewer refreshing a dashboard regenerated
    during training never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a dashboard is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_dashboard(run_dirs: list[Path], out: Path, bands: Mapping[str, Band] | None = None) -> Path:
    """Write the dashboard for `run_dirs` (overlaid) to `out` atomically and return `out`. `bands`
    defaults to `stability.bands.DEFAULT_BANDS`; pass a rules file's bands to draw those instead."""
    if not run_dirs:
        raise ValueError("render_dashboard needs at least one run directory")
    runs = load_runs(run_dirs)
    out = Path(out)
    _write_atomic(out, render_html(runs, DEFAULT_BANDS if bands is None else bands))
    return out

