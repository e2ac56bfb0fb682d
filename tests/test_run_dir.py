"""No silent data loss: the run dir contract (`mopd.run_dir`), checkpoint fallback / pruning / disk-full
behaviour (`mopd.checkpoint`, `mopd.atomic`) and the metrics JSONL's tolerance of torn lines (`mopd.jsonl`).

Everything runs on real files in tmp_path. Faults are injected where the product takes a writer (the `fill`
function of a checkpoint) or through the kernel (RLIMIT_FSIZE makes real short writes), never by patching
product code.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mopd.atomic import write_dir, write_text
from mopd.checkpoint import (
    CheckpointError,
    commit_checkpoint,
    latest_checkpoint,
    prune_checkpoints,
    resolve_latest,
    save_checkpoint,
)
from mopd.jsonl import JsonlSink, read_metrics
from mopd.run_dir import RunDirError, clean_stale, holds_run, prepare_run_dir

REPO = Path(__file__).resolve().parents[1]


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


def fake_step(run: Path, step: int, complete: bool = True, latest: bool = False) -> Path:
    d = run / "checkpoints" / f"step_{step}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "weights.bin").write_bytes(b"w" * 16)
    if complete:
        (d / "state.json").write_text(json.dumps({"step": step}))
    if latest:
        (run / "checkpoints" / "latest").write_text(f"step_{step}\n")
    return d


def filler(step: int, payload: bytes = b"x" * 64):
    def fill(tmp: Path) -> None:
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(payload)
        write_text(tmp / "state.json", json.dumps({"step": step}))
    return fill


def steps_on_disk(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def hidden(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


# -- prepare_run_dir: fresh runs ---------------------------------------------------------------------


def test_fresh_run_creates_the_dir(tmp_path):
    run = tmp_path / "a" / "run"
    assert prepare_run_dir(run, resume=False, overwrite=False, log=Log()) is None
    assert run.is_dir() and holds_run(run) == []


def test_fresh_run_in_an_empty_or_config_only_dir_is_fine(tmp_path):
    (tmp_path / "config.yaml").write_text("x: 1\n")
    (tmp_path / "checkpoints").mkdir()  # an empty checkpoints folder holds no run
    assert prepare_run_dir(tmp_path, resume=False, overwrite=False, log=Log()) is None


@pytest.mark.parametrize("what", ["metrics", "checkpoint"])
def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, what):
    run = tmp_path / "run"
    run.mkdir()
    if what == "metrics":
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
    else:
        fake_step(run, 3, latest=True)
    with pytest.raises(RunDirError) as ei:
        prepare_run_dir(run, resume=False, overwrite=False, log=Log())
    msg = str(ei.value)
    assert str(run) in msg and "--resume" in msg and "--overwrite" in msg
    assert ("metrics.jsonl" if what == "metrics" else "checkpoints/") in msg
    # Nothing was touched.
    assert (run / "metrics.jsonl").exists() if what == "metrics" else (run / "checkpoints" / "step_3").is_dir()


def test_overwrite_deletes_the_old_run_and_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "result.json", "result.md", "dashboard.html", "config.yaml"):
        (run / name).write_text("old\n")
    fake_step(run, 2, latest=True)
    (run / "checkpoints" / ".step_3.tmpab12").mkdir()
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_text("e")
    (run / "wandb").mkdir()
    (run / "wandb" / "run_id").write_text("abc\n")
    log = Log()
    assert prepare_run_dir(run, resume=False, overwrite=True, log=log) is None
    for name in ("metrics.jsonl", "result.json", "result.md", "dashboard.html", "checkpoints", "tensorboard"):
        assert not (run / name).exists(), name
    assert (run / "wandb" / "run_id").exists()  # tracking stores keep runs apart by id: kept
    assert "--overwrite" in log.text() and "deleted" in log.text()
    for name in ("metrics.jsonl", "checkpoints/", "result.json", "result.md", "dashboard.html"):
        assert name in log.text()
    assert holds_run(run) == []


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True, log=Log())


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a folder")
    for resume in (False, True):
        with pytest.raises(RunDirError, match="is a file"):
            prepare_run_dir(f, resume=resume, overwrite=False, log=Log())


def test_run_dir_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="cannot create run dir"):
        prepare_run_dir(tmp_path / "f" / "run", resume=False, overwrite=False, log=Log())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; see the /sys case")
def test_read_only_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            prepare_run_dir(run, resume=False, overwrite=False, log=Log())
    finally:
        run.chmod(0o755)


def test_unwritable_run_dir_is_a_clear_error():
    # A folder even root cannot create files in (sysfs): the writability probe, not permission bits, decides.
    d = Path("/sys")
    if not d.is_dir() or os.access(d, os.W_OK) and _can_create_in(d):
        pytest.skip("no unwritable folder to test with")
    with pytest.raises(RunDirError, match="not writable"):
        prepare_run_dir(d, resume=False, overwrite=False, log=Log())


def _can_create_in(d: Path) -> bool:
    try:
        p = d / ".mopd-probe"
        p.write_text("")
        p.unlink()
        return True
    except OSError:
        return False


# -- prepare_run_dir: resume -------------------------------------------------------------------------


def test_resume_picks_latest(tmp_path):
    fake_step(tmp_path, 2)
    fake_step(tmp_path, 4, latest=True)
    fake_step(tmp_path, 6)  # newer, but latest wins when it names a complete folder
    log = Log()
    assert prepare_run_dir(tmp_path, resume=True, overwrite=False, log=log) == tmp_path / "checkpoints" / "step_4"
    assert log == []


def test_resume_without_run_dir(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        prepare_run_dir(tmp_path / "nope", resume=True, overwrite=False, log=Log())


def test_resume_without_checkpoints_folder(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError) as ei:
        prepare_run_dir(tmp_path, resume=True, overwrite=False, log=Log())
    msg = str(ei.value)
    assert "nothing to resume" in msg and "checkpoints does not exist" in msg and "metrics.jsonl" in msg
    assert (tmp_path / "metrics.jsonl").exists()  # never a silent fresh start over the old metrics


def test_resume_with_dangling_latest_and_no_complete_step(tmp_path):
    fake_step(tmp_path, 3, complete=False)
    (tmp_path / "checkpoints" / "latest").write_text("step_7\n")
    with pytest.raises(RunDirError) as ei:
        prepare_run_dir(tmp_path, resume=True, overwrite=False, log=Log())
    msg = str(ei.value)
    assert "latest names step_7, which is missing" in msg
    assert "no complete step_N" in msg and "1 step_N folder(s) without state.json" in msg


def test_resume_with_empty_checkpoints_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunDirError, match="latest is missing.*no step_N folder at all"):
        prepare_run_dir(tmp_path, resume=True, overwrite=False, log=Log())


@pytest.mark.parametrize("latest", ["missing_folder", "incomplete_folder", "no_latest_file"])
def test_resume_falls_back_to_newest_complete_step(tmp_path, latest):
    fake_step(tmp_path, 2)
    fake_step(tmp_path, 10)  # numeric order, not string order: step_10 > step_9
    fake_step(tmp_path, 9)
    fake_step(tmp_path, 11, complete=False)  # a half-written folder is never chosen
    if latest == "missing_folder":
        (tmp_path / "checkpoints" / "latest").write_text("step_12\n")
    elif latest == "incomplete_folder":
        (tmp_path / "checkpoints" / "latest").write_text("step_11\n")
    log = Log()
    ck = prepare_run_dir(tmp_path, resume=True, overwrite=False, log=log)
    assert ck == tmp_path / "checkpoints" / "step_10"
    assert "falling back to the newest complete checkpoint step_10" in log.text()
    # The same logic behind latest_checkpoint, which logs when given a log.
    log2 = Log()
    assert latest_checkpoint(tmp_path, log=log2) == ck and "falling back" in log2.text()
    assert latest_checkpoint(tmp_path) == ck


def test_stale_temporaries_are_removed_at_start(tmp_path):
    fake_step(tmp_path, 2, latest=True)
    ck = tmp_path / "checkpoints"
    (ck / ".step_4.tmpx1y2").mkdir()
    (ck / ".step_4.tmpx1y2" / "optim.pt").write_bytes(b"partial")
    (ck / ".step_1.tmp-prune").mkdir()
    (ck / ".step_2.old").mkdir()  # step_2 exists: the old copy is stale
    (ck / ".latest.abcd1234").write_text("step_4\n")
    log = Log()
    assert prepare_run_dir(tmp_path, resume=True, overwrite=False, log=log) == ck / "step_2"
    assert hidden(tmp_path) == [] and steps_on_disk(tmp_path) == ["step_2"]
    assert "removed 4 stale temporaries" in log.text() and ".step_4.tmpx1y2" in log.text()


def test_stale_temporaries_alone_do_not_make_a_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".step_1.tmpzz").mkdir()
    log = Log()
    assert prepare_run_dir(tmp_path, resume=False, overwrite=False, log=log) is None
    assert hidden(tmp_path) == [] and "stale" in log.text()


def test_swap_interrupted_old_copy_is_restored(tmp_path):
    # A crash between "step_5 -> .step_5.old" and ".step_5.tmpX -> step_5" while re-saving step 5.
    d = fake_step(tmp_path, 5, latest=True)
    d.rename(d.with_name(".step_5.old"))
    (tmp_path / "checkpoints" / ".step_5.tmpq").mkdir()
    log = Log()
    assert prepare_run_dir(tmp_path, resume=True, overwrite=False, log=log) == d
    assert (d / "state.json").exists() and "restored" in log.text()
    assert hidden(tmp_path) == []
    assert clean_stale(tmp_path, log) == []


# -- checkpoints: pruning, disk full, modes ----------------------------------------------------------


def test_commit_prunes_beyond_keep_but_never_latest_or_best(tmp_path):
    log = Log()
    commit_checkpoint(tmp_path, 1, filler(1), keep=2)
    (tmp_path / "checkpoints" / "step_1" / "best").write_text("")  # marked best: never pruned
    for s in range(2, 6):
        commit_checkpoint(tmp_path, s, filler(s), keep=2)
    assert steps_on_disk(tmp_path) == ["step_1", "step_4", "step_5"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_5"
    assert hidden(tmp_path) == []
    # A `latest` that names an older folder (set by hand, or a fallback) protects it too.
    (tmp_path / "checkpoints" / "latest").write_text("step_4\n")
    commit_checkpoint(tmp_path, 6, filler(6), keep=0)  # keep=0: no pruning at all
    assert steps_on_disk(tmp_path) == ["step_1", "step_4", "step_5", "step_6"]
    (tmp_path / "checkpoints" / "latest").write_text("step_4\n")
    removed = prune_checkpoints(tmp_path, 1, log=log)
    assert [p.name for p in removed] == ["step_5"]
    assert steps_on_disk(tmp_path) == ["step_1", "step_4", "step_6"] and "pruned" in log.text()
    # Incomplete folders are never counted nor deleted.
    fake_step(tmp_path, 0, complete=False)
    prune_checkpoints(tmp_path, 1)
    assert "step_0" in steps_on_disk(tmp_path)


def test_save_checkpoint_keep_with_a_real_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = []

    def save_pretrained(path, state_dict, safe_serialization):
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save(state_dict, Path(path) / "weights.pt")
        saved.append(path)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = SimpleNamespace(
        checkpoint_state=lambda: (model.state_dict(), {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}),
        unwrapped=SimpleNamespace(save_pretrained=save_pretrained))
    tokenizer = SimpleNamespace(save_pretrained=lambda p: (Path(p) / "tokenizer.json").write_text("{}"))
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, trainer, tokenizer, {"note": s}, keep=1)
    assert steps_on_disk(tmp_path) == ["step_3"]
    ck = tmp_path / "checkpoints" / "step_3"
    assert json.loads((ck / "state.json").read_text()) == {"step": 3, "note": 3}
    assert torch.load(ck / "optim.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    commit_checkpoint(tmp_path, 1, filler(1))

    def fill_until_full(tmp: Path) -> None:
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(b"y" * 1024)  # half a checkpoint, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError) as ei:
        commit_checkpoint(tmp_path, 2, fill_until_full, keep=1)
    msg = str(ei.value)
    assert "no space left on device" in msg and str(tmp_path / "checkpoints" / "step_2") in msg
    assert "the previous checkpoint step_1 is intact" in msg and "latest still names it" in msg
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC
    assert steps_on_disk(tmp_path) == ["step_1"] and hidden(tmp_path) == []  # tmp cleaned
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert (tmp_path / "checkpoints" / "step_1" / "model" / "weights.bin").read_bytes() == b"x" * 64
    assert resolve_latest(tmp_path).path == tmp_path / "checkpoints" / "step_1"


def test_disk_full_reported_through_a_library_wrapper(tmp_path):
    # torch.save and safetensors wrap the OSError in their own exceptions; the cause chain still says ENOSPC.
    commit_checkpoint(tmp_path, 1, filler(1))

    def fill(tmp: Path) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e

    with pytest.raises(CheckpointError, match="no space left on device.*step_1 is intact"):
        commit_checkpoint(tmp_path, 2, fill)
    assert steps_on_disk(tmp_path) == ["step_1"] and hidden(tmp_path) == []


def test_resaving_the_same_step_that_fails_keeps_the_old_copy(tmp_path):
    commit_checkpoint(tmp_path, 3, filler(3, b"old"))

    def broken(tmp: Path) -> None:
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer") as ei:
        commit_checkpoint(tmp_path, 3, broken)
    assert any("step_3 is intact" in n for n in getattr(ei.value, "__notes__", []))
    assert (tmp_path / "checkpoints" / "step_3" / "model" / "weights.bin").read_bytes() == b"old"
    assert hidden(tmp_path) == []
    commit_checkpoint(tmp_path, 3, filler(3, b"new"))  # a good re-save swaps the folder and drops .old
    assert (tmp_path / "checkpoints" / "step_3" / "model" / "weights.bin").read_bytes() == b"new"
    assert hidden(tmp_path) == []


def test_no_previous_checkpoint_is_said_too(tmp_path):
    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="there was no previous checkpoint"):
        commit_checkpoint(tmp_path, 1, full)
    assert steps_on_disk(tmp_path) == [] and hidden(tmp_path) == []
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_modes_are_0755_and_0644(tmp_path):
    old = os.umask(0o022)
    try:
        commit_checkpoint(tmp_path, 1, filler(1))
        write_dir(tmp_path / "other", lambda t: (t / "f").write_text("x"))
    finally:
        os.umask(old)
    ck = tmp_path / "checkpoints" / "step_1"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(ck) == 0o755 and mode(tmp_path / "other") == 0o755
    assert mode(ck / "state.json") == 0o644 and mode(tmp_path / "checkpoints" / "latest") == 0o644
    assert mode(ck / "model" / "weights.bin") == 0o644


def test_modes_of_what_the_filler_wrote_privately_are_shared_too(tmp_path):
    """safetensors (under save_pretrained) writes model.safetensors 0600; mkdtemp makes folders 0700."""
    def fill(t: Path) -> None:
        import tempfile

        sub = Path(tempfile.mkdtemp(dir=t))
        fd, name = tempfile.mkstemp(dir=sub)
        os.close(fd)
        (t / "model.safetensors").write_bytes(b"w")
        (t / "model.safetensors").chmod(0o600)
        (t / "link").symlink_to(name)

    write_dir(tmp_path / "ck", fill)
    mode = lambda p: stat.S_IMODE(p.lstat().st_mode)  # noqa: E731
    files = [p for p in (tmp_path / "ck").rglob("*") if not p.is_symlink()]
    assert {mode(p) for p in files if p.is_file()} == {0o644} and {mode(p) for p in files if p.is_dir()} == {0o755}
    assert mode(tmp_path / "ck" / "model.safetensors") == 0o644


# -- metrics JSONL: torn lines and short writes ------------------------------------------------------


def _lines(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in steps)


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(_lines([1, 2, 3]) + '{"step": 4, "lo')  # what a short write on a full disk leaves
    with pytest.warns(RuntimeWarning, match=r"dropped 1 undecodable line\(s\) \(line 4;"):
        sink = JsonlSink(p, resume_step=3)
    assert [m["step"] for m in read_metrics(p)] == [1, 2, 3]
    sink.log(4, {"loss": 0.4})
    assert [m["step"] for m in read_metrics(p)] == [1, 2, 3, 4]


def test_resume_drops_torn_lines_anywhere_and_steps_past_the_checkpoint(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(_lines([1, 2]).encode() + b'{"step": 3, "x": \xff\n' + b"[1, 2]\n" + _lines([3, 4, 5]).encode())
    with pytest.warns(RuntimeWarning, match=r"2 undecodable line\(s\) \(line 3, 4;"):
        JsonlSink(p, resume_step=4)
    assert [m["step"] for m in read_metrics(p)] == [1, 2, 3, 4]
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_read_metrics_skips_torn_lines_with_a_warning(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(_lines([1]) + "{oops\n" + _lines([2]) + '{"step": 3')
    with pytest.warns(RuntimeWarning, match=r"skipped 2 undecodable line\(s\) \(line 2, 4;"):
        assert [m["step"] for m in read_metrics(p)] == [1, 2]


def test_fresh_sink_creates_0644_and_clean_file_untouched_on_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    old = os.umask(0o022)
    try:
        sink = JsonlSink(p)
        sink.log(1, {"a": float("nan"), "b": float("inf")})
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert read_metrics(p) == [{"step": 1, "a": None, "b": 1e308}]
    ino = p.stat().st_ino
    JsonlSink(p, resume_step=5)  # nothing to drop: the file is left as it is
    assert p.stat().st_ino == ino


SHORT_WRITE = textwrap.dedent("""
    import json, os, resource, signal, sys
    from mopd.jsonl import JsonlSink
    path, limit = sys.argv[1], int(sys.argv[2])
    sink = JsonlSink(path)
    sink.log(1, {"pad": "a" * 40})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: short write, then EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        sink.log(2, {"pad": "b" * 400})
    except OSError as e:
        print(json.dumps({"errno": e.errno, "msg": str(e)}))
        sys.exit(0)
    print(json.dumps({"errno": None, "msg": "no error"}))
""")


def test_short_write_raises_naming_the_file_and_leaves_no_torn_line(tmp_path):
    # RLIMIT_FSIZE makes the kernel accept only part of the line (a real short write) and refuse the rest,
    # as a filling disk does; the writer must notice, raise, and take the partial line back.
    p = tmp_path / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(p), "200"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["errno"] == errno.EFBIG, res
    assert "could not record step 2" in res["msg"] and str(p) in res["msg"]
    assert p.read_text().endswith("\n") and [m["step"] for m in read_metrics(p)] == [1]
