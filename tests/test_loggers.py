"""TensorBoard / W&B (offline) / MLflow sinks, each read back through the backend's own reader, and a
short real `mopd train` run that writes TensorBoard events."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from mopd.config import ConfigError, load_config
from mopd.jsonl import read_metrics
from mopd.logger import ProgressLogger, make_sinks

NAN, INF = float("nan"), float("inf")
# Real-looking step records, including what external sinks must survive: NaN, inf, a string, an int
# digest, a key with a character MLflow refuses ('@').
STEPS = {
    1: {"mopd/teacher_kl": 0.75, "actor/grad_norm": 1.5, "icepop/masked_frac": 0.0,
        "rollout_corr/extreme_token_frac@2": 0.125, "note": "warmup", "data/batch_digest": 123456789},
    2: {"mopd/teacher_kl": 0.5, "actor/grad_norm": 1.25, "icepop/masked_frac": NAN,
        "rollout_corr/extreme_token_frac@2": 0.0625, "note": "x", "data/batch_digest": 42, "is/mean": INF},
    3: {"mopd/teacher_kl": 0.25, "actor/grad_norm": 1.0, "icepop/masked_frac": 0.5,
        "rollout_corr/extreme_token_frac@2": 0.0, "note": "y", "data/batch_digest": 7},
}


def _log(sinks: list, steps: dict[int, dict]) -> None:
    for step, m in steps.items():
        for s in sinks:
            s.log(step, m)
    for s in sinks:
        s.close()


def _cfg(run_dir: Path, *extra: str):
    return load_config("configs/quickstart.yaml", [f"logging.run_dir={run_dir}", "experiment=logtest", *extra])


def _tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_round_trip_and_resume_purges_steps_past_checkpoint(tmp_path):
    run = tmp_path / "run"
    _log(make_sinks(["jsonl", "tensorboard"], run, None), STEPS)
    tb = _tb_scalars(run / "tensorboard")
    assert tb["mopd/teacher_kl"] == [(1, 0.75), (2, 0.5), (3, 0.25)]
    assert tb["rollout_corr/extreme_token_frac@2"] == [(1, 0.125), (2, 0.0625), (3, 0.0)]
    assert tb["icepop/masked_frac"] == [(1, 0.0), (3, 0.5)]  # NaN left out, not drawn as 0
    assert "is/mean" not in tb and "note" not in tb
    assert [(s, v) for s, v in tb["data/batch_digest"]] == [(1, 123456792.0), (2, 42.0), (3, 7.0)]  # float32
    assert read_metrics(run / "metrics.jsonl")[1]["icepop/masked_frac"] is None  # JSONL keeps the record

    # Resume from a checkpoint at step 1: the old steps 2-3 are purged, the new ones replace them.
    _log(make_sinks(["tensorboard"], run, 1), {2: {"mopd/teacher_kl": 0.375}, 3: {"mopd/teacher_kl": 0.125}})
    assert _tb_scalars(run / "tensorboard")["mopd/teacher_kl"] == [(1, 0.75), (2, 0.375), (3, 0.125)]

    # A fresh (not resumed) run in the same dir starts a clean curve.
    _log(make_sinks(["tensorboard"], run, None), {1: {"mopd/teacher_kl": 2.0}})
    assert _tb_scalars(run / "tensorboard")["mopd/teacher_kl"] == [(1, 2.0)]


def _wandb_records(path: Path):
    """Records of an offline W&B run file, parsed with W&B's own protobuf schema. The file is a LevelDB-style
    log (W&B's datastore): a 7-byte ':W&B' header, then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32, little-endian u16 length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        length, typ = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or typ == 0:  # block trailer / zero padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if typ in (2, 3):
            buf = chunk if typ == 2 else buf + chunk
            continue
        rec = pb.Record()
        rec.ParseFromString(buf + chunk if typ == 4 else chunk)
        yield rec


def _wandb_run(run_dir: Path) -> tuple[str, dict[int, dict], dict]:
    """The newest offline run's id, history and config, read back from W&B's own record file. W&B's
    service process may still be flushing that file when `finish()` returns on a loaded machine, so the
    read is repeated until its run record is there (bounded)."""
    for _ in range(60):
        got = _wandb_read(run_dir)
        if got[0]:
            return got
        time.sleep(0.5)
    return got


def _wandb_read(run_dir: Path) -> tuple[str, dict[int, dict], dict]:
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    assert files, f"no offline W&B run under {run_dir / 'wandb'}"
    run_id, history, config = "", {}, {}
    for rec in _wandb_records(files[-1]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = run_id or rec.run.run_id
            config.update({it.key: json.loads(it.value_json) for it in rec.run.config.update})
        elif kind == "history":
            row = {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item}
            history[row["_step"]] = row
        elif kind == "config":
            config.update({it.key: json.loads(it.value_json) for it in rec.config.update})
    return run_id, history, config


def test_wandb_offline_round_trip_config_and_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    cfg = _cfg(run)
    _log(make_sinks(["jsonl", "wandb"], run, None, cfg), STEPS)
    run_id, hist, config = _wandb_run(run)
    assert run_id == (run / "wandb" / "run_id").read_text().strip()
    assert sorted(hist) == [1, 2, 3]
    assert [hist[s]["mopd/teacher_kl"] for s in (1, 2, 3)] == [0.75, 0.5, 0.25]
    assert [hist[s]["rollout_corr/extreme_token_frac@2"] for s in (1, 2, 3)] == [0.125, 0.0625, 0.0]
    assert "icepop/masked_frac" not in hist[2] and hist[3]["icepop/masked_frac"] == 0.5
    assert "is/mean" not in hist[2] and "note" not in hist[1]
    assert config["trainer"]["steps"] == cfg.trainer.steps and config["experiment"] == "logtest"

    _log(make_sinks(["wandb"], run, 3, cfg), {4: {"mopd/teacher_kl": 0.125}})
    run_id2, hist2, _ = _wandb_run(run)
    assert run_id2 == run_id  # resumed into the same run
    assert hist2[4]["mopd/teacher_kl"] == 0.125


def test_mlflow_local_store_round_trip_params_and_resume(tmp_path):
    from mlflow import MlflowClient

    run = tmp_path / "run"
    cfg = _cfg(run)
    _log(make_sinks(["jsonl", "mlflow"], run, None, cfg), STEPS)
    run_id = (run / "mlflow" / "run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{(run / 'mlflow' / 'mlflow.db').resolve()}")

    def hist(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert hist("mopd/teacher_kl") == [(1, 0.75), (2, 0.5), (3, 0.25)]
    assert hist("icepop/masked_frac") == [(1, 0.0), (3, 0.5)]
    assert hist("rollout_corr/extreme_token_frac_2") == [(1, 0.125), (2, 0.0625), (3, 0.0)]
    assert hist("is/mean") == []
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == "logtest"
    assert client.get_experiment(r.info.experiment_id).name == "mopd"
    assert r.data.params["trainer.steps"] == str(cfg.trainer.steps)
    assert r.data.params["logging.sinks"] == "['jsonl']"
    assert r.info.artifact_uri.startswith((run / "mlflow").resolve().as_uri())

    cfg2 = _cfg(run, "trainer.steps=99")
    _log(make_sinks(["mlflow"], run, 3, cfg2), {4: {"mopd/teacher_kl": 0.125}})
    assert (run / "mlflow" / "run_id").read_text().strip() == run_id
    assert hist("mopd/teacher_kl")[-1] == (4, 0.125)
    r = client.get_run(run_id)
    assert r.data.params["trainer.steps"] == str(cfg.trainer.steps)  # params are write-once in MLflow
    assert r.data.tags["resumed_at_3.trainer.steps"] == "99"


def test_missing_logger_package_fails_before_anything_starts(tmp_path, monkeypatch, capsys):
    import mopd.logger
    from mopd.cli import main

    real = mopd.logger.importlib.util.find_spec
    monkeypatch.setattr(mopd.logger.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    code = main(["train", "configs/quickstart.yaml", f"logging.run_dir={tmp_path}/run", "ray.num_cpus=1",
                 "world.dir=/nonexistent/world", "logging.sinks=[jsonl,wandb]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "mopd: error: logging.sinks includes 'wandb'" in err and "pip install" in err and "wandb" in err


def test_wandb_mode_is_validated():
    with pytest.raises(ConfigError, match="logging.wandb_mode"):
        load_config("configs/quickstart.yaml", ["logging.wandb_mode=cloud"])


@pytest.mark.slow
# A real run's TensorBoard events: tests/test_train_loop.py::test_mopd_steps_lower_teacher_kl_and_engines_track_trainer.


# -- progress: a bar on a terminal, a few plain lines in a log file ---------------------------------------
def _step_record(step: int) -> dict:
    return {"mopd/teacher_kl": 1.0 / step, "reward/add": 0.5, "reward/rev": float("nan"), "timing_s/step": 0.01}


def test_progress_in_a_log_file_is_a_handful_of_plain_lines():
    out = io.StringIO()  # not a terminal
    p = ProgressLogger(total=2000, start=0, every_s=30.0, stream=out)
    for step in range(1, 2001):  # fast steps: well under 30 s in all
        p.log(step, _step_record(step))
        if step % 500 == 0:
            p.log(step, {"eval/add/acc": 0.9})  # eval records do not count
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # the first step, and the last at close
    assert lines[0].startswith("mopd step 1/2000 (0%), 0 s, kl=1.000 add=0.50"), lines[0]
    assert lines[1].startswith("mopd step 2000/2000 (100%) ") and " steps/s, " in lines[1], lines[1]
    assert lines[1].endswith("kl=0.001 add=0.50") and "\r" not in out.getvalue()


def test_progress_lines_come_at_most_every_n_seconds():
    now = [0.0]
    out = io.StringIO()
    p = ProgressLogger(total=1000, start=100, every_s=30.0, stream=out, clock=lambda: now[0])
    for step in range(101, 1001):  # 0.125 s a step (exact in binary): 112.5 s in all
        now[0] += 0.125
        p.log(step, _step_record(step))
    p.close()
    lines = out.getvalue().splitlines()
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert steps == [101, 341, 581, 821, 1000], lines  # 30 s apart, then the last step at close
    assert "8.00 steps/s" in lines[1] and lines[1].split(", ")[1] == "30 s", lines[1]
    p.close()
    assert len(out.getvalue().splitlines()) == 5  # nothing new: no repeated last line


def test_progress_on_a_terminal_is_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    p = ProgressLogger(total=10, start=0, stream=out)
    assert p.bar is not None
    for step in range(1, 11):
        p.log(step, _step_record(step))
    p.close()
    assert "\r" in out.getvalue() and "10/10" in out.getvalue() and "kl=0.100" in out.getvalue()
    assert ProgressLogger(total=10, start=0, stream=io.StringIO()).bar is None


def test_progress_every_s_is_validated():
    assert load_config("configs/quickstart.yaml").logging.progress_every_s == 30.0
    with pytest.raises(ConfigError, match=r"'logging.progress_every_s': got 0.0; allowed: a number > 0"):
        load_config("configs/quickstart.yaml", ["logging.progress_every_s=0"])
