"""Bad inputs of the commands around a run, through the real CLI in-process: `mopd check` and `mopd dashboard`
over a metrics.jsonl with unreadable lines or values, `mopd dashboard --out` where nothing can be written,
`mopd world build` into a folder it did not build, `mopd compare` with a broken spec or a run dir another
process holds, `mopd submit --status` without a config and `mopd submit` into a held run dir. Each is exit 2
and one line (`mopd: error: ...`, `mopd check: error: ...`, `mopd dashboard: error: ...`) naming the file,
key or row and the fix; none starts Ray (`init_ray` is a tripwire) or builds a world."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from test_run_lock import Holder

import mopd.ray_cluster
import mopd.session
import mopd.world.build
from mopd.cli import main


def _reached(*args, **kwargs):
    raise AssertionError("a bad input reached Ray or a world build: it must be refused before them")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(mopd.session, "init_ray", _reached)
    monkeypatch.setattr(mopd.ray_cluster, "init_ray", _reached)
    monkeypatch.setattr(mopd.world.build, "_build_into", _reached)


@pytest.fixture
def holder():
    made: list[Holder] = []
    yield lambda d: made.append(Holder(d)) or made[-1]
    for h in made:
        h.close()


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code: int, err: str, fragments: list[str], prefix: str = "mopd: error: ") -> None:
    assert code == 2, err
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err
    assert "Errno" not in err, err  # no raw errno text
    for f in fragments:
        assert f in err, (f, err)


# -- metrics.jsonl that holds lines or values no gate can read -------------------------------------------------
GOOD = {"rollout_corr/kl": 0.01, "rollout_corr/rollout_is_mean": 1.0, "actor/grad_norm": 0.5,
        "data/batch_digest": "9f2c"}  # a digest is a label, never a number: not "skipped"


@pytest.fixture
def dirty_run(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    lines = [json.dumps({"step": s, **GOOD}) for s in range(1, 41)]
    lines[4] = '{"step": 5, "rollout_corr/kl": 0.0'  # torn
    lines[8] = json.dumps({"step": 9, **GOOD, "rollout_corr/kl": "0.01"})  # a number written as text
    lines[11] = json.dumps([12, 0.01])  # not an object
    lines[13] = json.dumps({"step": "14", **GOOD})  # a step that is no number
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture
def clean_run(tmp_path) -> Path:
    d = tmp_path / "clean"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **GOOD}) + "\n" for s in (1, 2)))
    return d


RULES = "rollout_corr/kl: {abs_max: 0.1}\nactor/grad_norm: {}\n"


def _rules(tmp_path: Path) -> str:
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return str(p)


def test_check_refuses_a_metrics_file_with_unreadable_lines_naming_them(capsys, tmp_path, dirty_run):
    code, out, err = run(capsys, ["check", str(dirty_run), "--rules", _rules(tmp_path)])
    assert_one_line(code, err, ["metrics.jsonl: 3 line(s) skipped (line 5: not JSON; line 12: a JSON list, not an "
                                "object; line 14: step is '14', not a number)",
                                "1 non-numeric value(s) ignored (line 9: rollout_corr/kl = '0.01')",
                                "fix or remove those lines", "--no-strict"], prefix="mopd check: error: ")
    assert "not checked: " in out and "line 5: not JSON" in out, out  # the report says it too


def test_check_no_strict_reports_them_and_checks_the_rest(capsys, tmp_path, dirty_run):
    code, out, err = run(capsys, ["check", str(dirty_run), "--rules", _rules(tmp_path), "--no-strict"])
    assert code == 0 and err == "", err
    assert "not checked: " in out and "line 9: rollout_corr/kl = '0.01'" in out and "PASS" in out, out
    assert "rollout_corr/kl" in out and "ok (36 values)" in out, out  # 40 lines - 3 skipped - 1 text value


def test_check_of_a_clean_run_says_nothing_about_skipping(capsys, tmp_path, clean_run):
    code, out, err = run(capsys, ["check", str(clean_run), "--rules", _rules(tmp_path)])
    assert code == 0 and "not checked" not in out and err == "", (out, err)


def test_dashboard_warns_and_draws_or_refuses_under_strict(capsys, tmp_path, dirty_run):
    out_file = tmp_path / "dash.html"
    code, out, err = run(capsys, ["dashboard", str(dirty_run), "--out", str(out_file)])
    assert code == 0 and out_file.is_file(), err
    assert err.startswith("mopd dashboard: warning: ") and "line 5: not JSON" in err and "not drawn" in err, err
    assert "3 line(s) skipped (line 5: not JSON" in out_file.read_text()  # the page says so too
    out_file.unlink()
    code, out, err = run(capsys, ["dashboard", str(dirty_run), "--out", str(out_file), "--strict"])
    assert_one_line(code, err, ["metrics.jsonl: 3 line(s) skipped", "line 9: rollout_corr/kl", "drop --strict"],
                    prefix="mopd dashboard: error: ")
    assert not out_file.exists()


# -- dashboard output that cannot be written ----------------------------------------------------------------
def _unwritable_dir() -> Path:
    """A folder not even root can create files in (sysfs), else skip."""
    d = Path("/sys")
    try:
        (d / ".mopd-probe").write_text("")
    except OSError:
        return d
    (d / ".mopd-probe").unlink()
    pytest.skip("no unwritable folder to test with")


def test_dashboard_out_into_a_folder_that_cannot_be_written(capsys, tmp_path, clean_run):
    target = _unwritable_dir() / "dash.html"
    code, _, err = run(capsys, ["dashboard", str(clean_run), "--out", str(target)])
    assert_one_line(code, err, ["--out: cannot write /sys/dash.html", "choose a writable folder"],
                    prefix="mopd dashboard: error: ")
    assert ".dash.html." not in err and ".tmp" not in err, err  # the user's path, not a temporary's


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; the /sys case covers it")
def test_dashboard_out_into_a_read_only_folder(capsys, tmp_path, clean_run):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run(capsys, ["dashboard", str(clean_run), "--out", str(ro / "d.html")])
    finally:
        ro.chmod(0o755)
    assert_one_line(code, err, ["--out: cannot write", "Permission denied", "choose a writable folder"],
                    prefix="mopd dashboard: error: ")


# -- world build into someone else's folder -----------------------------------------------------------------
def test_world_build_into_a_foreign_non_empty_folder(capsys, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, ["world", "build", "configs/quickstart.yaml", f"world.dir={foreign}"])
    assert_one_line(code, err, [f"world.dir={foreign}", "not empty", "holds no world.json",
                                "choose another world.dir"])
    assert (foreign / "notes.txt").read_text() == "keep me"


# -- compare specs ------------------------------------------------------------------------------------------
def _spec(tmp_path: Path, **spec) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


BASE = {"base": "configs/quickstart.yaml", "budget_s": 5}
SPECS: list[tuple[str, dict | None, list[str]]] = [
    ("spec missing", None, ["compare spec ", "nope.yaml not found", "like configs/compare.yaml"]),
    ("no runs key", {**BASE}, ["defines no runs", "runs: None", "NAME: [key=value"]),
    ("empty runs", {**BASE, "runs": {}}, ["defines no runs", "runs: {}", "e.g. runs: {reverse_kl: ["]),
    ("base is the spec itself", {"base": "{spec}", "budget_s": 5, "runs": {"a": []}},
     ["base: ", "names the spec itself", "not a compare spec", "configs/quickstart.yaml"]),
    ("no base", {"budget_s": 5, "runs": {"a": []}}, ["base: got None", "the experiment config the runs start from"]),
    ("budget not a number", {**BASE, "budget_s": "long", "runs": {"a": []}}, ["budget_s: got 'long'", "a number > 0"]),
    ("run overrides not a list", {**BASE, "runs": {"a": "trainer.lr=1"}}, ["runs.a: got 'trainer.lr=1'", "a list"]),
    ("unknown key", {**BASE, "runs": {"a": []}, "budget": 3}, ["unknown keys ['budget']", "allowed: base"]),
]


@pytest.mark.parametrize("name, spec, fragments", SPECS, ids=[c[0] for c in SPECS])
def test_bad_compare_spec(capsys, tmp_path, name, spec, fragments):
    if spec is None:
        path = str(tmp_path / "nope.yaml")
    else:
        path = str(tmp_path / "spec.yaml")
        spec = {k: (v.replace("{spec}", path) if isinstance(v, str) else v) for k, v in spec.items()}
        _spec(tmp_path, **spec)
    code, _, err = run(capsys, ["compare", path])
    assert_one_line(code, err, fragments)


def test_compare_refuses_a_run_dir_another_process_holds_before_the_first_run(capsys, tmp_path, holder):
    out = tmp_path / "cmp"
    spec = _spec(tmp_path, **BASE, out_dir=str(out), runs={"first": [], "held": ["trainer.lr=3e-4"]})
    (out / "held").mkdir(parents=True)
    h = holder(out / "held")
    code, _, err = run(capsys, ["compare", spec])
    assert_one_line(code, err, [f"run dir {out / 'held'} is in use by pid {h.pid}", "choose another logging.run_dir"])
    assert not (out / "first" / ".lock").exists()  # the first run's hold was given back
    h.release()


def test_compare_refuses_an_earlier_run_up_front(capsys, tmp_path):
    out = tmp_path / "cmp"
    spec = _spec(tmp_path, **BASE, out_dir=str(out), runs={"first": [], "done": []})
    (out / "done").mkdir(parents=True)
    (out / "done" / "metrics.jsonl").write_text('{"step": 1}\n')
    code, _, err = run(capsys, ["compare", spec])
    assert_one_line(code, err, ["run dir", "of run 'done' already holds a run", "--overwrite", "--only"])


# -- submit -------------------------------------------------------------------------------------------------
def test_submit_status_needs_no_config(capsys, tmp_path, monkeypatch):
    """From a folder without configs/quickstart.yaml: only the address matters (here: nothing answers there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for flag in ("--status", "--stop"):
        code, _, err = run(capsys, ["submit", flag, "raysubmit_x", "--address", "http://127.0.0.1:9"])
        assert_one_line(code, err, ["no Ray job server answers at http://127.0.0.1:9"])
        assert "config" not in err.split("(")[0], err
    code, _, err = run(capsys, ["submit", "--status", "raysubmit_x"])
    assert_one_line(code, err, ["no Ray cluster to submit to", "--address http://127.0.0.1:8265"])
    assert "configs/quickstart.yaml" not in err and "ray.address in the config" not in err, err


def test_submit_into_a_held_run_dir_is_refused_before_the_upload(capsys, tmp_path, holder, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    h = holder(run_dir)
    code, _, err = run(capsys, ["submit", "configs/quickstart.yaml", f"logging.run_dir={run_dir}",
                                "--address", "http://127.0.0.1:9"])
    assert_one_line(code, err, [f"run dir {run_dir} is in use by pid {h.pid}", "would be refused",
                                "another logging.run_dir"])
    h.release()
