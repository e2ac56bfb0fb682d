"""Training-health dashboard: one self-contained HTML file for one or several runs.

Why a single file with its own small SVG renderer instead of a plotting library: the dashboard must
open offline (air-gapped clusters, CI artifacts, a file mailed around), stay small enough to keep per
run, and add no dependency to the training package. The renderer below is ~250 lines of plain
JavaScript; the data is embedded as JSON. Several runs are overlaid (one colour per run, labelled by
run directory name) so an ablation reads at a glance.

Panels follow the design reference's metrics: teacher KL and accuracy per domain (train vs eval),
rollout/trainer mismatch (`rollout_corr/*`) with the health bands of `stability.bands` shaded and
out-of-band points marked, IcePop masked fraction, IS mean and ESS, R3 router agreement and the
extreme-token fraction, grad norm, entropy, and stage timings. A panel whose metrics no run logged
says "no data (metric not logged)" instead of drawing an empty frame, so a missing metric is visible
as missing rather than mistaken for a flat line.

After rendering, the page sets `document.title` to `ok:<panels with data>/<panels>` (or `error: ...`
when a script error happened) and marks each panel `data-state="data" | "empty" | "nonfinite"`: the
browser test reads these from the DOM.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stability.bands import DEFAULT_BANDS, Band
from stability.gates import Rule, Series, check_series, read_series

NO_DATA = "no data (metric not logged)"
_EVAL_DASH = "5 4"


@dataclass
class SeriesSpec:
    """One curve per run in a panel: which metric, its legend label, and its line style."""

    metric: str
    label: str
    dash: str = ""


@dataclass
class PanelSpec:
    """A chart: title, section, the curves, an optional health band and fixed y range.

    `split_multi_run`: with several runs, draw one panel per series instead (six timing stages times
    N runs in one frame would be unreadable; with one run they read fine together)."""

    title: str
    section: str
    series: list[SeriesSpec]
    yfix: tuple[float, float] | None = None
    wide: bool = False
    split_multi_run: bool = False
    note: str = ""
    band: Band | None = field(default=None)


@dataclass
class RunData:
    name: str
    path: Path
    series: Series
    config: dict[str, Any]


# ---------------------------------------------------------------------------------------------- loading

def _read_config(run_dir: Path) -> dict[str, Any]:
    """`RUN_DIR/config.yaml` if readable (only used for notes such as "R3 off"); {} otherwise."""
    p = run_dir / "config.yaml"
    if not p.is_file():
        return {}
    try:
        import yaml

        data = yaml.safe_load(p.read_text())
    except Exception:  # a damaged config must not stop the dashboard; the metrics are what matter
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


def load_runs(run_dirs: list[Path]) -> list[RunData]:
    """Read every run's metrics and config. Raises FileNotFoundError naming a dir without metrics."""
    paths = [Path(d).resolve() for d in run_dirs]
    return [RunData(name=n, path=p, series=read_series(p), config=_read_config(p))
            for n, p in zip(_run_names(paths), paths, strict=True)]


# ---------------------------------------------------------------------------------------------- panels

def _domains(runs: list[RunData]) -> list[str]:
    pats = [r"^mopd/teacher_kl/([^/]+)$", r"^reward/([^/]+)/(acc|mean)$", r"^eval/([^/]+)/(acc|teacher_kl)$"]
    found: set[str] = set()
    for run in runs:
        for m in run.series:
            for p in pats:
                if mt := re.match(p, m):
                    found.add(mt.group(1))
    return sorted(found)


def _r3_off(runs: list[RunData]) -> bool:
    flags = [(r.config.get("algorithm") or {}).get("r3") for r in runs]
    return bool(flags) and all(f is False for f in flags)


def build_panels(runs: list[RunData]) -> list[PanelSpec]:
    """The panel list for these runs: fixed panels plus one per discovered domain."""
    S = SeriesSpec
    doms = _domains(runs)
    panels: list[PanelSpec] = []
    sec = "Distillation per domain"
    for d in doms:
        panels.append(PanelSpec(f"Teacher KL · {d}", sec, [
            S(f"mopd/teacher_kl/{d}", "train"), S(f"eval/{d}/teacher_kl", "eval", _EVAL_DASH)]))
    if not doms:
        panels.append(PanelSpec("Teacher KL per domain", sec, [S("mopd/teacher_kl/<domain>", "train")]))
    panels.append(PanelSpec("Teacher KL · all domains", sec, [S("mopd/teacher_kl", "train")]))
    for d in doms:
        panels.append(PanelSpec(f"Accuracy · {d}", sec, [
            S(f"reward/{d}/acc", "train reward"), S(f"eval/{d}/acc", "eval", _EVAL_DASH)], yfix=(0.0, 1.0)))
    if not doms:
        panels.append(PanelSpec("Accuracy per domain", sec, [S("reward/<domain>/acc", "train")], yfix=(0, 1)))

    sec = "Rollout / trainer mismatch"
    for m in ("kl", "k3_kl", "chi2_token", "log_ppl_diff", "ppl_ratio", "probs_diff_mean", "probs_diff_max"):
        panels.append(PanelSpec(f"rollout_corr/{m}", sec, [S(f"rollout_corr/{m}", m)]))

    sec = "Off-policy correction"
    panels.append(PanelSpec("IcePop masked fraction", sec, [S("icepop/masked_frac", "masked_frac")]))
    panels.append(PanelSpec("IS weight mean", sec, [S("is/mean", "is/mean")]))
    panels.append(PanelSpec("IS effective sample size", sec, [S("is/eff_sample_size", "ESS")]))

    sec = "Routing replay (R3) and extreme tokens"
    r3_note = " — R3 is off in the run config" if _r3_off(runs) else ""
    panels.append(PanelSpec("R3 router agreement", sec, [S("r3/router_agreement", "agreement")],
                            note=r3_note))
    panels.append(PanelSpec("R3 token mismatch / replayed", sec, [
        S("r3/token_any_mismatch", "token_any_mismatch"), S("r3/replayed_frac", "replayed_frac")],
        split_multi_run=True, note=r3_note))
    panels.append(PanelSpec("Extreme-token fraction (ratio > 2)", sec,
                            [S("rollout_corr/extreme_token_frac@2", "extreme@2")]))

    sec = "Optimisation and speed"
    panels.append(PanelSpec("Grad norm", sec, [S("actor/grad_norm", "grad_norm")]))
    panels.append(PanelSpec("Entropy", sec, [S("actor/entropy", "entropy")]))
    panels.append(PanelSpec("Policy loss", sec, [S("actor/pg_loss", "pg_loss")]))
    panels.append(PanelSpec("Throughput (tokens/s)", sec, [S("perf/tokens_per_s", "tokens/s")]))
    panels.append(PanelSpec("Stage timings (s)", sec, [
        S(f"timing_s/{t}", t) for t in ("rollout", "teacher", "reference", "train", "sync", "step")],
        wide=True, split_multi_run=True))
    return panels


def _band_for(metrics: list[str], bands: Mapping[str, Band]) -> Band | None:
    for m in metrics:
        if m in bands:
            return bands[m]
    for m in metrics:
        for pat, b in bands.items():
            if any(c in pat for c in "*?[") and fnmatch.fnmatchcase(m, pat):
                return b
    return None


# ---------------------------------------------------------------------------------------------- payload

def _num(v: float) -> float | None:
    # 6 significant digits keeps the file small without visibly changing any curve.
    return float(f"{v:.6g}") if math.isfinite(v) else None


def _band_json(b: Band | None) -> dict[str, Any] | None:
    if b is None or not b.bounded:
        return None
    lo, hi = b.limits()
    return {"lo": lo, "hi": hi, "after": b.after_step, "desc": b.describe()}


def _panel_json(p: PanelSpec, runs: list[RunData], multi: bool) -> dict[str, Any]:
    traces = []
    for ri, run in enumerate(runs):
        for si, s in enumerate(p.series):
            pts = run.series.get(s.metric)
            if not pts:
                continue
            if multi:
                label = run.name if len(p.series) == 1 else f"{run.name} · {s.label}"
            else:
                label = s.label if len(p.series) > 1 else s.metric
            traces.append({
                "label": label, "metric": s.metric, "color": ri if multi else si, "dash": s.dash,
                "x": [st for st, _ in pts], "y": [_num(v) for _, v in pts],
                "nonfinite": [st for st, v in pts if not math.isfinite(v)],
            })
    return {"title": p.title, "section": p.section, "wide": p.wide, "yfix": p.yfix,
            "band": _band_json(p.band), "metrics": [s.metric for s in p.series],
            "styles": [{"label": s.label, "dash": s.dash} for s in p.series],
            "empty": NO_DATA + p.note, "traces": traces}


def _summary(runs: list[RunData], bands: Mapping[str, Band]) -> list[dict[str, Any]]:
    """Per run: steps logged and, per banded metric, how many values left the band (the gate view)."""
    rules = [Rule(metric=m, band=b) for m, b in bands.items()]
    out = []
    for run in runs:
        steps = sorted({s for pts in run.series.values() for s, _ in pts})
        viol = check_series(run.series, rules)
        health = []
        for r in rules:
            names = r.matches(sorted(run.series))
            if not names:
                health.append({"metric": r.metric, "band": r.band.describe(), "state": "not logged"})
                continue
            n = sum(1 for v in viol if v.metric in names and v.band == r.band.describe())
            health.append({"metric": r.metric, "band": r.band.describe(),
                           "state": "ok" if n == 0 else f"{n} out of band"})
        wall = sum(v for _, v in run.series.get("timing_s/step", []) if math.isfinite(v))
        out.append({"name": run.name, "path": str(run.path), "steps": len(steps),
                    "last_step": steps[-1] if steps else None, "wall_s": round(wall, 1), "health": health})
    return out


def build_payload(runs: list[RunData], bands: Mapping[str, Band] = DEFAULT_BANDS) -> dict[str, Any]:
    """Everything the page needs, as JSON-able data (also handy for tests)."""
    multi = len(runs) > 1
    panels: list[dict[str, Any]] = []
    for p in build_panels(runs):
        p.band = _band_for([s.metric for s in p.series], bands)
        if multi and p.split_multi_run and len(p.series) > 1:
            for s in p.series:
                sub = PanelSpec(s.metric, p.section, [s], p.yfix,
                                note=p.note, band=_band_for([s.metric], bands))
                panels.append(_panel_json(sub, runs, multi))
        else:
            panels.append(_panel_json(p, runs, multi))
    return {
        "title": "mopd dashboard · " + ", ".join(r.name for r in runs),
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "runs": _summary(runs, bands), "multi": multi, "panels": panels,
    }


# ---------------------------------------------------------------------------------------------- html

_CSS = """
*{box-sizing:border-box}
body{font-family:"DejaVu Sans",Arial,Helvetica,sans-serif;margin:14px 18px;color:#1f2328;background:#f6f8fa;font-size:13px}
h1{font-size:19px;margin:0 0 4px}
h2{font-size:15px;margin:14px 0 6px;color:#444;border-bottom:1px solid #d0d7de;padding-bottom:2px}
.meta{color:#57606a;font-size:12px}
table.runs{border-collapse:collapse;margin:6px 0;font-size:12px;background:#fff}
table.runs td,table.runs th{border:1px solid #d0d7de;padding:2px 7px;text-align:left}
.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:bold}.na{color:#8c959f}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:8px}
.panel{background:#fff;border:1px solid #d0d7de;border-radius:5px;padding:5px 7px 4px;position:relative}
.panel.wide{grid-column:span 2}
.panel h3{font-size:13px;margin:0;font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.panel .sub{font-size:11px;color:#57606a;height:14px;white-space:nowrap;overflow:hidden}
.panel svg{width:100%;height:auto;display:block}
.nodata{height:150px;display:flex;align-items:center;justify-content:center;color:#8c959f;font-style:italic;
 border:1px dashed #d0d7de;border-radius:4px;margin:4px 0;text-align:center;padding:6px}
.legend{font-size:11px;line-height:14px;min-height:14px}
.legend span{margin-right:9px;white-space:nowrap}
.legend svg{width:22px;height:8px;display:inline;vertical-align:middle;margin-right:3px}
.tip{position:absolute;pointer-events:none;background:rgba(255,255,255,.95);border:1px solid #8c959f;
 border-radius:3px;padding:3px 5px;font-size:11px;display:none;z-index:5;white-space:nowrap}
#errors{color:#cf222e;white-space:pre-wrap;font-family:monospace}
#errors:empty{display:none}
.runlegend{position:sticky;top:0;background:#f6f8fa;padding:5px 0;z-index:10;font-size:12px}
.runlegend span{margin-right:14px;font-weight:600}
"""

# Runs before the renderer so that any error in it (or in the data) is caught and shown.
_ERROR_JS = """
window.__errors = [];
function __fail(msg){
  window.__errors.push(String(msg));
  document.title = 'error: ' + window.__errors[0];
  var e = document.getElementById('errors');
  if (e) e.textContent = window.__errors.join('\\n');
}
window.addEventListener('error', function(ev){ __fail(ev.message + (ev.lineno ? ' (line ' + ev.lineno + ')' : '')); });
window.addEventListener('unhandledrejection', function(ev){ __fail(ev.reason); });
"""

_RENDER_JS = r"""
(function(){
'use strict';
const D = JSON.parse(document.getElementById('mopd-data').textContent);
const PAL = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#17becf','#bcbd22','#7f7f7f'];
const NS = 'http://www.w3.org/2000/svg';
const H = 200, M = {l: 50, r: 10, t: 8, b: 24}, PH = H - M.t - M.b;

function h(tag, cls, parent, text){ const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; if (parent) parent.appendChild(e); return e; }
function s(tag, attrs, parent){ const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]); if (parent) parent.appendChild(e); return e; }
function color(i){ return PAL[i % PAL.length]; }

function niceStep(span, n){
  const raw = span / Math.max(1, n), mag = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / mag;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}
function ticks(lo, hi, n, integer){
  let st = niceStep(hi - lo, n); if (integer) st = Math.max(1, Math.round(st));
  const out = []; for (let v = Math.ceil(lo / st) * st; v <= hi + st * 1e-9; v += st) out.push(Math.abs(v) < st * 1e-9 ? 0 : v);
  return {vals: out, step: st};
}
function fmtTick(v, st, maxAbs){
  // One format per axis, chosen from the tick step, so neighbouring labels never print the same text.
  if (v === 0) return '0';
  if (maxAbs >= 1e5 || (maxAbs < 1e-2 && st < 1e-3)) {
    const digits = Math.max(1, Math.min(4, Math.ceil(Math.log10(maxAbs / st))));
    return v.toExponential(digits);
  }
  return v.toFixed(Math.max(0, Math.min(8, -Math.floor(Math.log10(st) + 1e-9))));
}
function fmt(v){
  if (v === null || v === undefined) return 'NaN';
  const a = Math.abs(v);
  if (v !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(3);
  return String(Number(v.toPrecision(5)));
}

function inBand(b, x, y){
  if (!b || (b.after !== null && x <= b.after)) return true;
  return (b.lo === null || y >= b.lo) && (b.hi === null || y <= b.hi);
}

function legendSwatch(parent, stroke, dash, label){
  const sp = h('span', '', parent); const sv = s('svg', {viewBox: '0 0 22 8'}, sp);
  s('line', {x1: 1, y1: 4, x2: 21, y2: 4, stroke: stroke, 'stroke-width': 2, 'stroke-dasharray': dash || ''}, sv);
  sp.appendChild(document.createTextNode(label));
}

function drawPanel(P, host, idx){
  const div = h('div', 'panel' + (P.wide ? ' wide' : ''), host);
  div.dataset.panel = P.title;
  h('h3', '', div, P.title).title = P.metrics.join(', ');
  h('div', 'sub', div, P.band ? ('health band: ' + P.band.desc) : '');
  let xs = [], ys = [], nNonFinite = 0;
  for (const tr of P.traces){
    nNonFinite += tr.nonfinite.length;
    for (let i = 0; i < tr.x.length; i++){ if (tr.y[i] !== null){ xs.push(tr.x[i]); ys.push(tr.y[i]); } }
  }
  if (!xs.length){
    div.dataset.state = P.traces.length ? 'nonfinite' : 'empty';
    h('div', 'nodata', div, P.traces.length ? ('no finite data (' + nNonFinite + ' NaN/inf values)') : P.empty);
    return false;
  }
  div.dataset.state = 'data';
  // A wide panel spans two grid columns: a wider viewBox keeps its text the size of the others'.
  const W = P.wide ? 810 : 400, PW = W - M.l - M.r;
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  for (const tr of P.traces) for (const x of tr.nonfinite){ x0 = Math.min(x0, x); x1 = Math.max(x1, x); }
  if (x0 === x1){ x0 -= 1; x1 += 1; }
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (P.yfix){ y0 = Math.min(y0, P.yfix[0]); y1 = Math.max(y1, P.yfix[1]); }
  if (P.band){ if (P.band.lo !== null) y0 = Math.min(y0, P.band.lo); if (P.band.hi !== null) y1 = Math.max(y1, P.band.hi); }
  if (y0 === y1){ const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
  const X = x => M.l + (x - x0) / (x1 - x0) * PW, Y = y => M.t + (y1 - y) / (y1 - y0) * PH;

  const svg = s('svg', {viewBox: `0 0 ${W} ${H}`, role: 'img'}, div);
  s('title', {}, svg).textContent = P.title;
  const cid = 'clip' + idx;
  s('rect', {x: M.l, y: M.t, width: PW, height: PH}, s('clipPath', {id: cid}, s('defs', {}, svg)));
  s('rect', {x: M.l, y: M.t, width: PW, height: PH, fill: '#fff', stroke: '#d0d7de'}, svg);
  const yt = ticks(y0, y1, 5, false), xt = ticks(x0, x1, 6, true);
  const yMaxAbs = Math.max(...yt.vals.map(Math.abs));
  for (const v of yt.vals){
    s('line', {x1: M.l, x2: M.l + PW, y1: Y(v), y2: Y(v), stroke: '#eaeef2'}, svg);
    s('text', {x: M.l - 4, y: Y(v) + 3.5, 'text-anchor': 'end', 'font-size': 10, fill: '#57606a'}, svg).textContent = fmtTick(v, yt.step, yMaxAbs);
  }
  for (const v of xt.vals){
    s('line', {x1: X(v), x2: X(v), y1: M.t + PH, y2: M.t + PH + 3, stroke: '#8c959f'}, svg);
    s('text', {x: X(v), y: M.t + PH + 14, 'text-anchor': 'middle', 'font-size': 10, fill: '#57606a'}, svg).textContent = String(v);
  }
  s('text', {x: M.l + PW, y: H - 1, 'text-anchor': 'end', 'font-size': 9, fill: '#8c959f'}, svg).textContent = 'step';
  const g = s('g', {'clip-path': `url(#${cid})`}, svg);
  const b = P.band;
  if (b){
    const top = b.hi === null ? M.t : Y(b.hi), bot = b.lo === null ? M.t + PH : Y(b.lo);
    const left = b.after === null ? M.l : Math.max(M.l, X(b.after));
    s('rect', {x: left, y: top, width: Math.max(0, M.l + PW - left), height: Math.max(0, bot - top), fill: 'rgba(46,160,67,0.12)'}, g);
    for (const v of [b.lo, b.hi]) if (v !== null)
      s('line', {x1: left, x2: M.l + PW, y1: Y(v), y2: Y(v), stroke: '#2da44e', 'stroke-dasharray': '4 3', 'stroke-width': 1}, g);
  }
  for (const tr of P.traces){
    let d = '', pen = false;
    for (let i = 0; i < tr.x.length; i++){
      const y = tr.y[i];
      if (y === null){ pen = false; continue; }
      d += (pen ? 'L' : 'M') + X(tr.x[i]).toFixed(1) + ' ' + Y(y).toFixed(1); pen = true;
    }
    s('path', {d: d, fill: 'none', stroke: color(tr.color), 'stroke-width': 1.6, 'stroke-dasharray': tr.dash || '',
               'stroke-linejoin': 'round'}, g);
    const dots = tr.x.length <= 40;
    for (let i = 0; i < tr.x.length; i++){
      const y = tr.y[i]; if (y === null) continue;
      const lone = (i === 0 || tr.y[i - 1] === null) && (i === tr.x.length - 1 || tr.y[i + 1] === null);
      if (!inBand(b, tr.x[i], y))
        s('circle', {cx: X(tr.x[i]), cy: Y(y), r: 2.8, fill: '#cf222e'}, g);
      else if (dots || lone)
        s('circle', {cx: X(tr.x[i]), cy: Y(y), r: 2, fill: color(tr.color)}, g);
    }
    for (const x of tr.nonfinite)
      s('text', {x: X(x), y: M.t + PH - 2, 'text-anchor': 'middle', 'font-size': 10, fill: '#cf222e'}, g).textContent = '×';
  }
  const guide = s('line', {y1: M.t, y2: M.t + PH, stroke: '#8c959f', 'stroke-dasharray': '2 2', visibility: 'hidden'}, svg);
  const tip = h('div', 'tip', div);
  svg.addEventListener('mousemove', ev => {
    const r = svg.getBoundingClientRect(), vx = (ev.clientX - r.left) / r.width * W;
    if (vx < M.l || vx > M.l + PW){ tip.style.display = 'none'; guide.setAttribute('visibility', 'hidden'); return; }
    const step = Math.round(x0 + (vx - M.l) / PW * (x1 - x0));
    let best = null;
    for (const tr of P.traces) for (const x of tr.x) if (best === null || Math.abs(x - step) < Math.abs(best - step)) best = x;
    const lines = ['step ' + best];
    for (const tr of P.traces){ const i = tr.x.indexOf(best); if (i >= 0) lines.push(tr.label + ': ' + fmt(tr.y[i])); }
    tip.textContent = lines.join('\n'); tip.style.whiteSpace = 'pre'; tip.style.display = 'block';
    const px = (X(best) / W) * r.width;
    tip.style.left = Math.min(px + 14, r.width - tip.offsetWidth) + 'px'; tip.style.top = '40px';
    guide.setAttribute('x1', X(best)); guide.setAttribute('x2', X(best)); guide.setAttribute('visibility', 'visible');
  });
  svg.addEventListener('mouseleave', () => { tip.style.display = 'none'; guide.setAttribute('visibility', 'hidden'); });
  const leg = h('div', 'legend', div);
  if (D.multi){
    // Colour is the run (legend at the top); here only the line styles, when a panel has several.
    if (P.styles.length > 1) for (const st of P.styles) legendSwatch(leg, '#57606a', st.dash, st.label);
  } else for (const tr of P.traces) legendSwatch(leg, color(tr.color), tr.dash, tr.label);
  if (nNonFinite) h('span', 'bad', leg, '× ' + nNonFinite + ' non-finite');
  return true;
}

function header(root){
  h('h1', '', root, D.title);
  h('div', 'meta', root, 'generated ' + D.generated + ' · ' + D.runs.length + ' run(s) · shaded: health band, red: outside it');
  const t = h('table', 'runs', root), hr = h('tr', '', t);
  const bandCols = D.runs.length ? D.runs[0].health : [];
  for (const c of ['run', 'steps', 'last step', 'wall s', ...bandCols.map(x => x.metric + ' ' + x.band)]) h('th', '', hr, c);
  D.runs.forEach((r, i) => {
    const tr = h('tr', '', t), nc = h('td', '', tr);
    const sw = h('span', '', nc, '■ '); sw.style.color = D.multi ? color(i) : '#1f2328';
    nc.appendChild(document.createTextNode(r.name)); nc.title = r.path;
    h('td', '', tr, String(r.steps)); h('td', '', tr, r.last_step === null ? '-' : String(r.last_step));
    h('td', '', tr, String(r.wall_s));
    for (const x of r.health) h('td', x.state === 'ok' ? 'ok' : x.state === 'not logged' ? 'na' : 'bad', tr, x.state);
  });
  if (D.multi){
    const rl = h('div', 'legend runlegend', root);
    D.runs.forEach((r, i) => legendSwatch(rl, color(i), '', r.name));
  }
}

const root = document.getElementById('root');
header(root);
let withData = 0, section = null, grid = null;
D.panels.forEach((P, i) => {
  if (P.section !== section){ section = P.section; h('h2', '', root, section); grid = h('div', 'grid', root); }
  if (drawPanel(P, grid, i)) withData++;
});
document.body.dataset.panels = String(D.panels.length);
document.body.dataset.panelsWithData = String(withData);
if (!window.__errors.length) document.title = 'ok:' + withData + '/' + D.panels.length;
})();
"""


def render_html(payload: dict[str, Any]) -> str:
    """The complete page. Data goes in a JSON script block with `<` escaped, so no run name or metric
    can close the script tag."""
    data = json.dumps(payload, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<title>mopd dashboard (rendering)</title>\n"
        f"<style>{_CSS}</style>\n<script>{_ERROR_JS}</script>\n</head><body>\n"
        "<noscript>This dashboard draws its charts with JavaScript; enable it to see them.</noscript>\n"
        "<div id=\"errors\"></div><div id=\"root\"></div>\n"
        f"<script type=\"application/json\" id=\"mopd-data\">{data}</script>\n"
        f"<script>{_RENDER_JS}</script>\n</body></html>\n"
    )


def _write_atomic(out: Path, text: str) -> None:
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
    """Write the dashboard for `run_dirs` (overlaid, one colour per run) to `out`, atomically (a temp
    file in the same folder, then `os.replace`), so a viewer refreshing a dashboard regenerated during
    training never sees half a file. `bands` defaults to `stability.bands.DEFAULT_BANDS`; pass the
    bands of a rules file to draw those instead. Returns `out`."""
    if not run_dirs:
        raise ValueError("render_dashboard needs at least one run directory")
    runs = load_runs([Path(d) for d in run_dirs])
    out = Path(out)
    _write_atomic(out, render_html(build_payload(runs, DEFAULT_BANDS if bands is None else bands)))
    return out
