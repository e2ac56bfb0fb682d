"""Training as a Ray job on a real loopback head (`mopd submit`, `ray job submit`), the run's placement
group, and the errors a user meets on the way (no cluster, no token, a bad key, too few CPUs).

The head is a separate `ray start` with its own temp dir and ports, talked to over HTTP only: the
session's in-process Ray (`ray_local`) is a different cluster and is left alone. Token auth is on, as
Ray 2.60 enables it by default, with a token file of this test's own.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_train_loop import world_overrides

from mopd.config import ConfigError, load_config, to_yaml
from mopd.jsonl import read_metrics
from mopd.placement import plan_bundles, reserve
from mopd.ray_cluster import cluster_address
from mopd.submit import SubmitError, connect, dashboard_url, entrypoint, runtime_env

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 900


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A head bound to 127.0.0.1 on free ports, started from the venv so its jobs find `mopd` on PATH."""
    temp = Path(tempfile.mkdtemp(prefix="mopdrj", dir="/tmp"))  # short: Ray's socket paths live under it
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    client_env = {**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head_env = {**client_env, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--num-cpus", "2", "--temp-dir", str(temp), "--disable-usage-stats",
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr)]
    # A session of its own: every head process (and each job's workers) is in this process group.
    proc = subprocess.Popen(cmd, env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=temp)
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        yield {"url": f"http://127.0.0.1:{dash}", "env": client_env, "temp": temp}
    finally:
        _kill_group(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _mopd(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mopd.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _check_run(run: Path, steps: int) -> None:
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl") if "actor/grad_norm" in m] == list(
        range(1, steps + 1))
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == steps and set(result["after"]) == {"add", "rev", "sort"}
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
    assert (run / "checkpoints" / f"step_{steps}" / "model" / "config.json").exists()


# -- the job path end to end ----------------------------------------------------------------------------
@pytest.mark.slow
def test_mopd_submit_trains_on_a_loopback_head(tiny_world, ray_head, tmp_path):
    run = tmp_path / "run"
    args = ["submit", "configs/quickstart.yaml", *world_overrides(tiny_world), "trainer.steps=2",
            f"logging.run_dir={run}", "--address", ray_head["url"]]
    p = _mopd(args, ray_head["env"], timeout=JOB_TIMEOUT_S)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    job_id = re.search(r"submitted (\S+) to", p.stdout).group(1)
    assert f"{job_id}: SUCCEEDED" in p.stdout
    # The job's own log, streamed back: the run reserved its bundles (4 engines x 0.25 CPU + trainer 1 CPU).
    assert "placement group ready" in p.stdout and "trainer 1 x {CPU: 1}" in p.stdout, p.stdout[-4000:]
    _check_run(run, 2)
    status = _mopd(["submit", "--status", job_id, "--address", ray_head["url"]], ray_head["env"])
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    # What was uploaded: code and configs, none of .venv, .git, runs/, .cache/.
    pkgs = [p for p in ray_head["temp"].glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert pkgs
    for pkg in pkgs:
        assert (pkg / "configs" / "quickstart.yaml").exists() and (pkg / "mopd" / "train.py").exists()
        for heavy in (".venv", ".git", "runs", ".cache"):
            assert not (pkg / heavy).exists(), f"{heavy} was uploaded"


@pytest.mark.slow
def test_ray_job_submit_cli_runs_mopd_train(tiny_world, ray_head, tmp_path):
    """The README's `ray job submit --working-dir . -- mopd train ...` as written."""
    run = tmp_path / "run"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["url"], "--working-dir", ".", "--",
           "mopd", "train", "configs/quickstart.yaml", *world_overrides(tiny_world), "trainer.steps=1",
           f"logging.run_dir={run}"]
    p = subprocess.run(cmd, env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "succeeded" in out, out[-6000:]
    _check_run(run, 1)


def test_submit_refuses_without_a_token_or_a_server(ray_head, tmp_path):
    no_token = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_MODE"}
    p = _mopd(["submit", "configs/quickstart.yaml", "--address", ray_head["url"]], no_token)
    assert p.returncode == 2 and "export RAY_AUTH_MODE=token" in p.stderr, p.stderr
    (port,) = _free_ports(1)
    p = _mopd(["submit", "configs/quickstart.yaml", "--address", f"http://127.0.0.1:{port}"], ray_head["env"])
    assert p.returncode == 2 and "no Ray job server answers" in p.stderr and "ray start --head" in p.stderr
    p = _mopd(["submit", "configs/quickstart.yaml", "trainer.stepz=2", "--address", ray_head["url"]], ray_head["env"])
    assert p.returncode == 2 and "unknown config key 'trainer.stepz'" in p.stderr
    p = _mopd(["submit", "--status", "raysubmit_nosuchjob", "--address", ray_head["url"]], ray_head["env"])
    assert p.returncode == 2 and "raysubmit_nosuchjob" in p.stderr


# -- submission pieces without a cluster ----------------------------------------------------------------
def test_dashboard_url_precedence_and_errors():
    cfg = load_config("configs/quickstart.yaml", ["ray.address=http://10.0.0.1:8265"])
    assert dashboard_url("http://127.0.0.1:1/", cfg, {"RAY_ADDRESS": "http://x:2"}) == "http://127.0.0.1:1"
    assert dashboard_url(None, cfg, {"RAY_ADDRESS": "127.0.0.1:8265"}) == "http://127.0.0.1:8265"
    assert dashboard_url(None, cfg, {"RAY_API_SERVER_ADDRESS": "http://a:1", "RAY_ADDRESS": "http://b:2"}) == "http://a:1"
    assert dashboard_url(None, cfg, {}) == "http://10.0.0.1:8265"
    with pytest.raises(SubmitError, match="no Ray cluster to submit to.*ray start --head"):
        dashboard_url(None, load_config("configs/quickstart.yaml"), {})
    with pytest.raises(SubmitError, match="dashboard"):
        dashboard_url("ray://127.0.0.1:10001", cfg, {})


def test_address_flag_wins_over_ray_address_when_connecting(monkeypatch):
    """Ray's own client lets RAY_ADDRESS override the URL it is given; `mopd submit --address` must not."""
    ours, theirs = _free_ports(2)
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{theirs}")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{theirs}")
    with pytest.raises(SubmitError) as e:
        connect(f"http://127.0.0.1:{ours}")
    assert f"127.0.0.1:{ours}" in str(e.value) and str(theirs) not in str(e.value)
    assert os.environ["RAY_ADDRESS"] == f"http://127.0.0.1:{theirs}"  # the caller's environment is restored


def test_secrets_travel_by_name_only(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["ray.runtime_env.env_vars_from_env=[MOPD_TEST_API_KEY]",
                                                  "ray.runtime_env.env_vars.VLLM_LOGGING_LEVEL=INFO"])
    env = runtime_env(cfg, {"MOPD_TEST_API_KEY": "s3cr3t-value"})
    assert env["env_vars"] == {"VLLM_LOGGING_LEVEL": "INFO", "MOPD_TEST_API_KEY": "s3cr3t-value"}
    assert env["working_dir"] == str(Path(".").resolve()) and "/.venv" in env["excludes"]
    resolved = to_yaml(cfg)  # what the job writes to RUN_DIR/config.yaml
    assert "MOPD_TEST_API_KEY" in resolved and "s3cr3t-value" not in resolved
    with pytest.raises(SubmitError, match="MOPD_TEST_API_KEY.*export it"):
        runtime_env(cfg, {})
    with pytest.raises(ConfigError, match="env_vars.WANDB_API_KEY.*env_vars_from_env"):
        load_config("configs/quickstart.yaml", ["ray.runtime_env.env_vars.WANDB_API_KEY=abc"])


def test_entrypoint_pins_relative_outputs_to_the_working_dir(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["trainer.steps=3"])
    cmd = entrypoint("configs/quickstart.yaml", ["trainer.steps=3"], cfg, resume=True)
    wd = Path(".").resolve()
    assert cmd == (f"mopd train configs/quickstart.yaml trainer.steps=3 world.dir={wd}/.cache/world "
                   f"logging.run_dir={wd}/runs/quickstart --resume")
    flags = entrypoint("configs/quickstart.yaml", [], cfg, train_flags=["--resume-from", "step_4",
                                                                        "--allow-teacher-change"])
    assert flags.endswith("/runs/quickstart --resume-from step_4 --allow-teacher-change"), flags
    absolute = load_config("configs/quickstart.yaml", [f"world.dir={tmp_path}", f"logging.run_dir={tmp_path}/r"])
    assert "world.dir" not in entrypoint("configs/quickstart.yaml", [], absolute).split("quickstart.yaml")[1]
    outside = tmp_path / "x.yaml"
    shutil.copy("configs/quickstart.yaml", outside)
    with pytest.raises(SubmitError, match="outside ray.runtime_env.working_dir"):
        entrypoint(str(outside), [], cfg)
    with pytest.raises(SubmitError, match="matches ray.runtime_env.excludes"):
        entrypoint("runs/quickstart/config.yaml", [], cfg)


def test_entrypoint_pins_only_the_directories_the_config_has():
    """The core pins logging.run_dir; other directories come from registered sections the config names."""
    wd = Path(".").resolve()
    no_world = load_config("configs/gpu_cluster.yaml", ["logging.run_dir=runs/g"])
    cmd = entrypoint("configs/gpu_cluster.yaml", [], no_world)
    assert cmd == f"mopd train configs/gpu_cluster.yaml logging.run_dir={wd}/runs/g" and "world" not in cmd
    with_world = load_config("configs/gpu_cluster.yaml", ["logging.run_dir=/abs/g", "world.dir=w"])
    assert entrypoint("configs/gpu_cluster.yaml", [], with_world).endswith(f"world.dir={wd}/w")


def test_dashboard_url_in_config_yields_to_the_jobs_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what Ray sets for a job's entrypoint
    assert cluster_address("http://127.0.0.1:8265") == "127.0.0.1:6379"
    assert cluster_address("10.0.0.2:6379") == "10.0.0.2:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) is None
    with pytest.raises(ConfigError, match="dashboard URL.*mopd submit"):
        cluster_address("http://127.0.0.1:8265")


# -- placement groups -----------------------------------------------------------------------------------
def test_bundles_follow_the_config():
    cfg = load_config("configs/quickstart.yaml", [
        "rollout.num_engines=2", "rollout.num_cpus_per_engine=0.5", "rollout.num_gpus_per_engine=0.25",
        "teachers.add_teacher.replicas=2", "teachers.add_teacher.num_cpus=2", "teachers.rev_teacher.num_gpus=0",
        "trainer.num_cpus=3", "trainer.num_gpus=1"])
    plan = plan_bundles(cfg)
    assert plan.bundles == [{"CPU": 0.5, "GPU": 0.25}] * 2 + [{"CPU": 2.0, "GPU": 0.25}] * 2 + [
        {"CPU": 0.5}, {"CPU": 0.5, "GPU": 0.25}, {"CPU": 3.0, "GPU": 1.0}]
    assert plan.roles == {"student": [0, 1], "teacher:add_teacher": [2, 3], "teacher:rev_teacher": [4],
                          "teacher:sort_teacher": [5], "trainer": [6]}
    assert plan.demand() == {"CPU": 9.0, "GPU": 2.25}
    assert plan.actor_resources("teacher:rev_teacher") == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert "trainer" not in plan_bundles(cfg, trainer=False).roles
    with pytest.raises(ConfigError, match="cannot be empty"):
        load_config("configs/quickstart.yaml", ["trainer.num_cpus=0"])


def test_placement_group_too_big_for_the_cluster_fails_fast_and_says_why(ray_local):
    cfg = load_config("configs/quickstart.yaml", ["experiment=too_big", "rollout.num_cpus_per_engine=1"])
    with pytest.raises(ConfigError) as e:
        reserve(cfg)
    msg = str(e.value)
    assert "needs {CPU: 5} but the cluster has {CPU: 2}" in msg, msg
    assert "rollout.num_cpus_per_engine" in msg and "trainer.num_cpus" in msg and "student 1 x {CPU: 1}" in msg
    # Refused before asking Ray: a private cluster cannot grow, so there is nothing to wait for.
    assert "mopd-too_big" not in {t["name"] for t in ray_local.util.placement_group_table().values()}
    spread = load_config("configs/quickstart.yaml", ["ray.placement_strategy=STRICT_SPREAD"])
    with pytest.raises(ConfigError, match="STRICT_SPREAD puts each of the 5 bundles on its own node"):
        reserve(spread)


def test_actors_run_in_their_bundles(ray_local):
    cfg = load_config("configs/quickstart.yaml", ["ray.placement_timeout_s=30"])
    placement = reserve(cfg)
    try:

        @ray_local.remote
        class Probe:
            def where(self):
                import ray

                ctx = ray.get_runtime_context()
                return ctx.get_placement_group_id(), ctx.get_assigned_resources()

        (strategy,) = placement.strategies("trainer")
        probe = Probe.options(**placement.plan.actor_resources("trainer"), scheduling_strategy=strategy).remote()
        pg_id, resources = ray_local.get(probe.where.remote())
        assert pg_id == placement.pg.id.hex()
        assert resources.get("CPU") == 1.0, resources
        assert len(placement.strategies("student")) == 1 and placement.strategies("nope") is None
    finally:
        placement.remove()
    assert ray_local.util.placement_group_table(placement.pg)["state"] == "REMOVED"
