"""`mopd dashboard` and `mopd check`: the dashboard and the health gates from the command line.

Kept apart from `mopd/cli.py` so that the CLI only registers them (`add_parsers(sub)`); both commands
import nothing heavier than PyYAML and Plotly, so they start instantly and work on a laptop that only copied a
run directory.

Exit codes of `check`: 0 no violation, 1 violations (the report lists them), 2 unusable input (bad
rules file, run without metrics) — the usual "usage error" code, so CI can tell "unhealthy run" from
"the check itself is broken".

`--strict` means "refuse to judge on doubtful input" for both commands: lines of metrics.jsonl that are not JSON
objects with a numeric step, and non-numeric values of a metric that is numeric elsewhere, are always reported
with their line numbers; under `--strict` they are exit 2. For `check` it is the default (a gate should not
pass over lines it could not read; `--no-strict` checks the rest), and it also covers rules naming metrics the
run never logged. For `dashboard` it is off by default (a viewer draws what it can and warns; the page lists
the skipped lines too).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

DEFAULT_RULES = "configs/gates/default.yaml"


def _rules_source(arg: str | None) -> str | Path | None:
    """The rules file to use. The default path is tried from the current directory, then from the
    repository this package lives in (so `mopd check` works from any folder); if neither exists the
    built-in bands are used (None)."""
    if arg and arg != DEFAULT_RULES:
        return arg
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / DEFAULT_RULES).is_file():
            return base / DEFAULT_RULES
    return None


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Render one HTML dashboard for the given run dirs (overlaid) and print where it went."""
    from stability.dashboard import render_dashboard
    from stability.gates import RulesError, load_rules, read_series_checked

    runs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else runs[0] / "dashboard.html"
    bands = None
    try:
        if args.rules:
            bands = {r.metric: r.band for r in load_rules(args.rules) if r.band.bounded}
        skipped = [sk for run in runs if (sk := read_series_checked(run)[1])]
        if skipped and args.strict:
            print(f"mopd dashboard: error: {'; '.join(sk.describe() for sk in skipped)}: fix or remove them, or "
                  "drop --strict to draw the rest", file=sys.stderr)
            return 2
        path = render_dashboard(runs, out, bands=bands)
    except (FileNotFoundError, RulesError) as e:
        print(f"mopd dashboard: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the page cannot be written there
        flag = "--out" if args.out else f"the default --out ({out}, in the first run dir)"
        print(f"mopd dashboard: error: {flag}: cannot write {out} ({e.strerror or e}): choose a writable "
              f"folder{'' if args.out else ' with --out FILE'}", file=sys.stderr)
        return 2
    for sk in skipped:
        print(f"mopd dashboard: warning: {sk.describe()}: not drawn", file=sys.stderr)
    print(f"dashboard: {path} ({len(runs)} run(s))")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check a run against a rules file; print the report; 1 when any violation, 2 on bad input."""
    from stability.gates import RulesError, check_series, format_report, load_rules, read_series_checked

    try:
        rules = load_rules(_rules_source(args.rules))
        series, skipped = read_series_checked(args.run_dir)
    except (FileNotFoundError, RulesError) as e:
        print(f"mopd check: error: {e}", file=sys.stderr)
        return 2
    violations = check_series(series, rules)
    print(format_report(args.run_dir, rules, violations, series, max_per_metric=args.max_per_metric,
                        skipped=skipped))
    if skipped and args.strict:
        # A gate must not pass a run over lines it could not read (a torn write, a hand edit, a bug).
        print(f"mopd check: error: {skipped.describe()}: the rules did not see them; fix or remove those lines "
              "(`mopd train --resume` drops a torn last line itself), or pass --no-strict to check the rest",
              file=sys.stderr)
        return 2
    missing = [r.metric for r in rules if not r.required and not r.matches(sorted(series))]
    if missing and args.strict:
        # A misspelt metric would otherwise turn its gate off and still PASS.
        hints = []
        for m in missing:
            close = difflib.get_close_matches(m, sorted(series), n=1, cutoff=0.6)
            hints.append(f"{m} (did you mean {close[0]}?)" if close else m)
        print(f"mopd check: error: the rules name metric(s) this run never logged: {', '.join(hints)}; fix the "
              "name, or pass --no-strict when the run is not meant to log them (e.g. teacher KL in an orm run)",
              file=sys.stderr)
        return 2
    return 1 if violations else 0


def add_parsers(subparsers: Any) -> None:
    """Register `dashboard` and `check` on the CLI's subparsers (`p.add_subparsers(...)`)."""
    sp = subparsers.add_parser("dashboard", help="one self-contained HTML dashboard for one or more runs")
    sp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (overlaid)")
    sp.add_argument("--out", metavar="FILE", help="output HTML (default: RUN_DIR/dashboard.html of the first run)")
    sp.add_argument("--rules", metavar="FILE", help="draw the bands of this rules file instead of the defaults")
    sp.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                    help="exit 2, drawing nothing, when a run's metrics.jsonl has lines or values that cannot be "
                         "read (default: draw the rest, warn and list them on the page)")
    sp.set_defaults(fn=cmd_dashboard)

    sp = subparsers.add_parser("check", help="check a run's metrics against health bands; non-zero on violation")
    sp.add_argument("run_dir", metavar="RUN_DIR")
    sp.add_argument("--rules", metavar="FILE", default=DEFAULT_RULES,
                    help=f"YAML rules: metric -> {{min, max, abs_max, after_step, allow_nan, required}} "
                         f"(default: {DEFAULT_RULES})")
    sp.add_argument("--max-per-metric", type=int, default=5, help="violations listed per metric (default 5)")
    sp.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                    help="exit 2 when metrics.jsonl has lines or values that cannot be read, or a rule names a "
                         "metric the run never logged (default; --no-strict reports them and checks the rest)")
    sp.set_defaults(fn=cmd_check)
