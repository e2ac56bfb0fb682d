"""`scripts/gpu_acceptance.sh` on a machine without a GPU: `--dry-run` prints the whole plan (GPU install, world,
the bf16-engine quickstart with R3 capture, the table) and validates every run's config; bad arguments exit 2.
`benchmarks/run_table.py` reads finished run dirs into the table the script prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = "scripts/gpu_acceptance.sh"


def test_dry_run_prints_the_plan_and_validates_its_configs(tmp_path):
    out = subprocess.run(["bash", SCRIPT, "--dry-run", "--budget-s", "45", "--out", str(tmp_path / "acc")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cmds = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert cmds[0] == "env MOPD_TARGET=gpu bash scripts/setup.sh"
    assert cmds[1] == ".venv/bin/mopd world build configs/quickstart_bf16.yaml"
    train = [c for c in cmds if c.startswith(".venv/bin/mopd train ")]
    assert train and all("configs/quickstart_bf16.yaml" in c and "algorithm.r3_capture=true" in c
                         and "trainer.max_wallclock_s=45" in c and c.endswith("--overwrite") for c in train)
    assert f"logging.run_dir={tmp_path}/acc/dedicated" in train[0]
    assert cmds[-1].startswith(".venv/bin/python benchmarks/run_table.py ")
    assert "two-worker run skipped" in out.stdout  # one GPU planned on a machine without one
    assert not (tmp_path / "acc").exists()  # nothing ran


def test_bad_arguments_exit_2_with_one_line():
    for args in (["--budget-s", "ten"], ["--nope"]):
        out = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith("gpu_acceptance: error: ") and out.stderr.count("\n") == 1


def test_run_table_reads_finished_runs(tmp_path):
    run = tmp_path / "dedicated"
    run.mkdir()
    steps = [{"step": s, "timing_s/step": 0.2 + s, "perf/tokens_per_s": 100.0 * s, "timing_s/train": 0.1,
              "perf/mem_gb/total": 3.0 + s, "r3/own_router_agreement": 0.9} for s in (1, 2, 3, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in steps))
    (run / "result.json").write_text(json.dumps({"after": {"add": {"acc": 0.45}, "rev": {"acc": 0.9}},
                                                 "teacher": {"add": 0.9, "rev": 1.0}}))
    out = subprocess.run([sys.executable, "benchmarks/run_table.py", str(run)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    header, _, row = out.stdout.strip().splitlines()
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")],
                     strict=True))
    # Medians over the steps after the first; memory is the peak.
    assert cells["steps"] == "4" and cells["tokens/s"] == "300.000" and cells["mem GB"] == "7.000"
    assert cells["after/teacher"] == "add 0.50, rev 0.90" and cells["old_log_prob s"] == "nan"
    missing = subprocess.run([sys.executable, "benchmarks/run_table.py", str(tmp_path / "none")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr and Path(tmp_path / "none").name in missing.stderr
