"""Errors carry their cause to the user: an error raised inside a Ray actor arrives as `RayTaskError(ConfigError)`
whose text is a coloured remote traceback with the actor's repr; the CLI prints one `mopd: error:` line with the
innermost project error's own message (exit 2), or the carried error as `Type: first line` and where it was
raised (exit 1), never ANSI codes or reprs; `--debug` prints the chain, then the traceback.

The wrapped errors are real: Ray's own `RayTaskError` around the project's own exceptions (fast lane), and one
raised by a real trainer actor on a loopback cluster (slow)."""

from __future__ import annotations

import re
import traceback

import pytest
from ray.exceptions import RayActorError, RayTaskError

import mopd.cli
from mopd.cli import main
from mopd.cli.errors import error_chain, error_line
from mopd.config import ConfigError
from mopd.trainer import frozen_names

NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.gate.weight", "lm_head.weight"]


def remote(exc_factory, function: str = "TrainerWorker.build") -> BaseException:
    """What `ray.get` raises when the actor method raised `exc_factory()` (Ray's own classes and formatting)."""
    try:
        exc_factory()
    except Exception as e:  # noqa: BLE001
        # Ray writes the coloured `ray::Actor.method() (pid=..., repr=...)` header over the traceback itself.
        return RayTaskError(function, traceback.format_exc(), e, proctitle=f"ray::{function}", pid=4242, ip="127.0.0.1",
                            actor_repr="<mopd.trainer_actor.TrainerWorker object at 0x7f3a2c1b9d50>").as_instanceof_cause()
    raise AssertionError("the factory did not raise")


RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+(, ip=[0-9.]+)?\)")


def run_raising(monkeypatch, capsys, err: BaseException, *flags: str) -> tuple[int, str]:
    def cmd(_args):
        raise err

    monkeypatch.setattr(mopd.cli, "cmd_config_show", cmd)
    code = main([*flags, "config", "show", "configs/quickstart.yaml"])
    return code, capsys.readouterr().err


def assert_clean_line(err: str) -> None:
    assert err.count("\n") == 1 and err.startswith("mopd: error: "), err
    for bad in ("\x1b", "RayTaskError", "repr=", "object at 0x", "pid=", "Traceback"):
        assert bad not in err, (bad, err)


@pytest.mark.parametrize("patterns, fragment", [(["nope.*"], "pattern 'nope.*' matches no parameter"),
                                                (["*"], "freezes every parameter; nothing would train")],
                         ids=["matches-nothing", "matches-everything"])
def test_a_project_error_from_an_actor_prints_its_own_message(monkeypatch, capsys, patterns, fragment):
    err = remote(lambda: frozen_names(NAMES, patterns))
    assert type(err).__name__ == "RayTaskError(ConfigError)" and "\x1b[" in str(err)  # what the user used to get
    code, out = run_raising(monkeypatch, capsys, err)
    assert code == 2, out
    assert_clean_line(out)
    assert out.startswith("mopd: error: config key 'trainer.freeze': ") and fragment in out, out


def test_the_innermost_project_error_wins_through_nested_wrappers(monkeypatch, capsys):
    """An actor calling another actor: RayTaskError(RayTaskError(...)) around the ConfigError, plus `from`."""
    def nested():
        inner = remote(lambda: frozen_names(NAMES, ["x*"]), "TrainerWorker.build")
        raise RuntimeError("the trainer could not start") from inner

    code, out = run_raising(monkeypatch, capsys, remote(nested, "Producer.next"))
    assert code == 2 and "pattern 'x*' matches no parameter" in out, out
    assert_clean_line(out)


def test_a_foreign_error_from_an_actor_is_type_message_and_place(monkeypatch, capsys):
    def loss():
        raise ValueError("teacher top-k id >= vocabulary size 64: teacher and student vocabularies differ\nmore")

    code, out = run_raising(monkeypatch, capsys, remote(loss, "TrainerWorker.step"))
    assert code == 1, out
    assert_clean_line(out)
    assert out == ("mopd: error: ValueError: teacher top-k id >= vocabulary size 64: teacher and student "
                   "vocabularies differ (in TrainerWorker.step) (run with --debug for the traceback)\n"), out


def test_an_explicit_message_around_an_actor_death_is_kept(monkeypatch, capsys):
    """`raise RuntimeError("... continue with --resume") from RayActorError`: the outer message says what to do."""
    try:
        raise RayActorError()
    except RayActorError as died:
        err = RuntimeError("the trainer actor died 4 times (ray.max_restarts=3); the last checkpoint is intact: "
                           "continue with --resume")
        err.__cause__ = died
    code, out = run_raising(monkeypatch, capsys, err)
    assert code == 1 and "continue with --resume" in out and out.startswith("mopd: error: RuntimeError: "), out


def test_debug_prints_the_chain_then_the_traceback(monkeypatch, capsys):
    err = remote(lambda: frozen_names(NAMES, ["nope.*"]))
    with pytest.raises(ConfigError):  # the dual class is a ConfigError too: the traceback follows
        run_raising(monkeypatch, capsys, err, "--debug")
    out = capsys.readouterr().err
    lines = out.splitlines()
    assert lines[0].startswith("mopd: error: config key 'trainer.freeze': pattern 'nope.*'"), out
    assert lines[1] == "mopd: the error's chain, outermost first:"
    assert "ray.exceptions.RayTaskError(ConfigError)" in lines[2] and "mopd.config.ConfigError: config key" in lines[3]
    assert [type(x).__name__ for x in error_chain(err)] == ["RayTaskError(ConfigError)", "ConfigError"]


def test_error_line_of_plain_errors_is_unchanged():
    assert error_line(ConfigError("config key 'x': bad")) == ("config key 'x': bad", 2)
    msg, code = error_line(FileNotFoundError(2, "No such file or directory", "/x/y"))
    assert (msg, code) == ("No such file or directory: /x/y", 1)
    assert error_line(KeyError("k"))[0] == "KeyError: 'k' (run with --debug for the traceback)"


@pytest.mark.slow
def test_a_real_trainer_actor_error_reaches_the_user_as_its_message(ray_local, tmp_path, monkeypatch, capsys):
    """A trainer actor on a real loopback cluster refuses `trainer.freeze` (the run checks it before the
    cluster now; the actor still does, for any other caller): what `ray.get` raises becomes one clean line."""
    from tiny_config import REQUIRED_OVERRIDES
    from tiny_models import save_tiny_models

    from mopd.config import load_config
    from mopd.trainer_actor import TrainerWorker

    save_tiny_models(tmp_path)
    capsys.readouterr()  # the save's progress bars
    cfg = load_config(None, [*REQUIRED_OVERRIDES, f"student.path={tmp_path}/student", "trainer.freeze=[nope.*]",
                             "algorithm.objective=orm", "rollout.n=2"])
    actor = ray_local.remote(TrainerWorker).options(num_cpus=0).remote(cfg)
    try:
        with pytest.raises(ConfigError) as e:
            ray_local.get(actor.build.remote(str(tmp_path / "student")))
    finally:
        ray_local.kill(actor)
    assert isinstance(e.value, RayTaskError) and "\x1b[" in str(e.value)
    code, out = run_raising(monkeypatch, capsys, e.value)
    # Ray's log monitor forwards the actor's own output ("(TrainerWorker pid=...) Loading weights ...") to this
    # process's stderr whenever it gets to it, possibly while the CLI runs: that line is the actor's, not the CLI's.
    # Lines split at "\n" only: a forwarded progress bar carries "\r"s inside its one line.
    out = "".join(ln for ln in re.findall(r"[^\n]*\n|[^\n]+$", out) if not RAY_FORWARDED.match(ln))
    assert code == 2, out
    assert_clean_line(out)
    assert "config key 'trainer.freeze': pattern 'nope.*' matches no parameter of the student" in out, out
