"""Config errors must name the key, the value given and what is allowed."""

import subprocess
import sys

import pytest

from mopd.config import ConfigError, load_config

QS = "configs/quickstart.yaml"


def test_quickstart_config_resolves():
    cfg = load_config(QS)
    assert cfg.teachers["add_teacher"].domains == ["add"]
    assert cfg.student.path == ".cache/world/student"
    assert cfg.logging.run_dir == "runs/quickstart"


def test_override_changes_value_and_interpolation():
    cfg = load_config(QS, ["trainer.steps=3", "world.dir=/tmp/w", "experiment=x"])
    assert cfg.trainer.steps == 3
    assert cfg.student.path == "/tmp/w/student"
    assert cfg.logging.run_dir == "runs/x"


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("trainer.stpes=3", ["unknown config key 'trainer.stpes'", "steps", "prompts_per_step"]),
        ("nokey=1", ["unknown config key 'nokey'", "trainer", "rollout"]),
        ("teachers.add_teacher.domanis=[x]", ["teachers.add_teacher.domanis", "domains"]),
        ("trainer.steps=abc", ["trainer.steps", "'abc'", "Integer"]),
        ("algorithm.correction=foo", ["algorithm.correction", "'foo'", "icepop", "tis"]),
        ("rollout.n=0", ["rollout.n", "got 0", ">= 1"]),
        ("trainer.lr=-1", ["trainer.lr", "-1.0", "> 0"]),
        ("logging.sinks=[jsonl,foo]", ["logging.sinks", "'foo'", "tensorboard"]),
        ("teachers.rev_teacher.domains=[add]", ["teachers.rev_teacher.domains", "'add'", "add_teacher"]),
        ("data.default_teacher=nobody", ["data.default_teacher", "'nobody'", "add_teacher"]),
        ("algorithm.icepop_low=2", ["icepop_low", "0 < icepop_low < 1 < icepop_high"]),
        ("trainer.steps", ["not of the form key=value"]),
    ],
)
def test_bad_overrides_are_refused_with_a_clear_message(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(QS, [override])
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_bad_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.temprature'.*temperature"):
        load_config(p)


def test_missing_teacher_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teachers:\n  t:\n    domains: [a]\n")
    with pytest.raises(ConfigError, match=r"teachers.t.path"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")


def test_cli_config_show_and_error():
    ok = subprocess.run([sys.executable, "-m", "mopd.cli", "config", "show", QS, "trainer.steps=7"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "steps: 7" in ok.stdout and "add_teacher" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mopd.cli", "config", "show", QS, "trainer.stpes=7"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown config key 'trainer.stpes'" in bad.stderr
    assert "Traceback" not in bad.stderr
