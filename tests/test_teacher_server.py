"""A teacher behind a real vLLM OpenAI-compatible server (one per module): its scores, samples and multi-turn
samples (through the rollout's environment loop) equal the in-cluster engine's, `mopd teachers check` passes
against it (and fails on what it must catch), and `mopd train` runs with it as one domain's teacher."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_config import write_config as write_tiny_config
from transformers import AutoConfig, AutoTokenizer

from mopd.cli import main
from mopd.data import encode_rows
from mopd.jsonl import read_metrics
from mopd.multiturn import TurnLimits
from mopd.producer import teacher_rollout
from mopd.world.tasks import read_jsonl
from rollout.envs import ENVIRONMENTS, EnvStep, register_environment
from rollout.types import EngineSpec
from teachers.http_teacher import ServerTeacher, start_server_teacher
from teachers.registry import TeacherRegistry
from teachers.vllm_teacher import start_teacher

pytestmark = pytest.mark.slow
KEY_ENV = "MOPD_TEST_TEACHER_KEY"
KEY = "test-key-4f1c9e"  # the server's key; the config only ever names KEY_ENV
MML = 64
# Set at collection, before the suite's shared Ray cluster starts: the key is never carried by Ray, so
# server-teacher actors find it only in the environment their workers inherited when Ray started.
os.environ[KEY_ENV] = KEY


class _Tool:
    """Ends a turn on any letter (what the rev teacher writes) and answers `=<turn number>`. 26 stop strings:
    more than a completion request may carry (the client cuts the turns itself)."""

    stop = tuple(string.ascii_lowercase)

    def step(self, row, trajectory, last_turn):
        return EnvStep(f"={len(trajectory) // 2 + 1}", info={"tool_call": 1})


class _FewStops(_Tool):
    stop = ("a", "e", "i", "o")  # the server matches these itself


for _name, _cls in {"t_server_tool": _Tool, "t_server_few": _FewStops}.items():
    if _name not in ENVIRONMENTS:
        register_environment(_name, _cls)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_world, tmp_path_factory):
    """`vllm serve` of the tiny world's rev teacher on loopback, flags mirroring the in-cluster engine."""
    path = f"{tiny_world['dir']}/teachers/rev"
    vocab = AutoConfig.from_pretrained(path).vocab_size
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false", "VLLM_API_KEY": KEY}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(MML), "--max-logprobs", str(vocab),
           "--enforce-eager", "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--seed", "0",
           "--generation-config", "vllm", "--disable-uvicorn-access-log"]
    os.environ[KEY_ENV] = KEY
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, f"vllm server exited:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"vllm server not healthy in time:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield {"url": url, "path": path, "vocab": vocab}
    finally:
        os.environ.pop(KEY_ENV, None)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_config(path: Path, world: dict, teachers: dict, **sections) -> str:
    return write_tiny_config(path, world, teachers, experiment="server_test", **sections)


def server_teacher(server: dict, **extra) -> dict:
    return {"path": server["path"], "domains": ["rev"], "backend": "vllm_server", "urls": [server["url"]],
            "api_key_env": KEY_ENV, **extra}


@pytest.fixture(scope="module")
def probe(tiny_world):
    d = tiny_world["dir"]
    tok = AutoTokenizer.from_pretrained(f"{d}/student")
    rows = read_jsonl(os.path.join(d, "data", "eval.jsonl"))[::7][:12]
    prompts = encode_rows(tok, rows, 32)
    seqs = [p + tok(str(r["answer"]), add_special_tokens=False)["input_ids"] for p, r in zip(prompts, rows, strict=True)]
    return prompts, seqs, [len(p) for p in prompts]


def test_server_scores_equal_in_cluster_engine(server, tiny_world, ray_local, probe):
    prompts, seqs, plens = probe

    class Cfg:  # a TeacherConfig's client fields
        path, urls, served_model, timeout_s, api_key_env = server["path"], [server["url"]], None, 60.0, KEY_ENV
        max_retries, max_concurrency, request_batch_size = 2, 3, 5  # several concurrent batched requests

    remote = start_server_teacher("rev_teacher", Cfg)[0]
    engine = start_teacher(EngineSpec(server["path"], max_model_len=MML, dtype="float32", max_top_k=-1,
                                      enforce_eager=True, num_cpus=0.25, num_gpus=0, omp_threads=1, kv_cache_gb=1,
                                      gpu_memory_utilization=0.3), replicas=1)[0]
    try:
        info = ray_local.get(remote.ready.remote())
        assert "error" not in info, info
        assert info["max_logprobs"] == info["vocab_size"] == server["vocab"] and info["max_model_len"] == MML
        for k in (0, 3, -1):
            got, ref = ray_local.get([remote.score.remote(seqs, plens, k), engine.score.remote(seqs, plens, k)])
            assert len(got) == len(ref) == len(seqs)
            for g, r in zip(got, ref, strict=True):
                assert len(g.logprobs) == len(r.logprobs) > 0
                assert max(abs(a - b) for a, b in zip(g.logprobs, r.logprobs, strict=True)) < 1e-5
                assert (g.topk_ids is None) == (r.topk_ids is None) == (k == 0)
                assert k == 0 or (g.topk_ids == r.topk_ids).all()
                for gl, rl in zip(g.topk_logprobs if k else [], r.topk_logprobs if k else [], strict=True):
                    assert max((abs(a - b) for a, b in zip(gl, rl, strict=True)), default=0.0) < 1e-5
            if k == -1:
                assert all(len(ids) == server["vocab"] for g in got for ids in g.topk_ids)
        # Teacher samples (the SFT baseline) also come back as the engine's: same seed, same tokens.
        g_srv, g_eng = ray_local.get([remote.generate.remote(prompts[:3], n=2, temperature=1.0, max_tokens=8, seed=5),
                                      engine.generate.remote(prompts[:3], n=2, temperature=1.0, max_tokens=8, seed=5)])
        assert [[s.response_ids for s in g] for g in g_srv] == [[s.response_ids for s in g] for g in g_eng]
        for gs, ge in zip(g_srv, g_eng, strict=True):
            for a, b in zip(gs, ge, strict=True):
                assert max(abs(x - y) for x, y in zip(a.rollout_logprobs, b.rollout_logprobs, strict=True)) < 1e-5
        # Multi-turn teacher samples (rows naming an environment) through the rollout's environment loop: the
        # server's trajectories are the engine's, turn for turn, with the environment's tokens masked.
        tok = AutoTokenizer.from_pretrained(server["path"])
        rows = [{"id": f"m{i}", "domain": "rev", "prompt": "", "env": env}
                for i, env in enumerate(["t_server_tool", "t_server_few"] * 3)]
        registry = TeacherRegistry()
        registry.register("rev_teacher", ["rev"], server["path"])
        limits = TurnLimits(max_tokens=6, max_turns=3, max_total_tokens=24)
        srv, eng = (teacher_rollout({"rev_teacher": [actor]}, registry, prompts[:6], rows, n=1, temperature=1.0,
                                    max_tokens=6, seed=11, tokenizer=tok, limits=limits) for actor in (remote, engine))
        assert [(s.sample.response_ids, s.sample.student_mask, s.sample.meta) for s in srv] == \
               [(s.sample.response_ids, s.sample.student_mask, s.sample.meta) for s in eng]
        for env in ("t_server_tool", "t_server_few"):  # the client's cut and the server's stop strings
            assert any(0 in s.sample.student_mask for s in srv if s.row["env"] == env), env
        assert max(s.sample.meta["turns"] for s in srv) >= 2
        for a, b in zip(srv, eng, strict=True):
            assert max(abs(x - y) for x, y in zip(a.sample.rollout_logprobs, b.sample.rollout_logprobs,
                                                  strict=True)) < 1e-5
            obs = [t for t, k in zip(a.sample.response_ids, a.sample.student_mask, strict=True) if not k]
            assert tok.decode(obs).startswith("=1")  # the environment's answer to the first turn
        # A sequence longer than the server's context is refused with the fix, not truncated.
        with pytest.raises(Exception, match="max_model_len"):
            ray_local.get(remote.score.remote([[3] * MML], [1], 0))
    finally:
        ray_local.kill(remote)
        ray_local.kill(engine)


def test_api_key_comes_from_the_named_env_var(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    info = ServerTeacher("rev_teacher", server["url"], path=server["path"], api_key_env=KEY_ENV).ready()
    assert KEY_ENV in info["error"] and "not set" in info["error"]
    monkeypatch.setenv(KEY_ENV, "wrong-key-123")
    info = ServerTeacher("rev_teacher", server["url"], path=server["path"], api_key_env=KEY_ENV).ready()
    assert "refused the API key" in info["error"] and "wrong-key-123" not in info["error"]
    monkeypatch.setenv(KEY_ENV, KEY)
    assert "error" not in ServerTeacher("rev_teacher", server["url"], path=server["path"], api_key_env=KEY_ENV).ready()


def test_teachers_check_against_server(server, tiny_world, tmp_path, capsys):
    cfg = write_config(tmp_path / "ok.yaml", tiny_world, {"rev_teacher": server_teacher(server)})
    assert main(["teachers", "check", cfg]) == 0
    out = capsys.readouterr().out
    for line in ["ok    tokenizer", "ok    reachable", "ms per probe request", "ok    context",
                 "ok    tokenization", "ok    max_logprobs", "ok    deterministic", "max |diff| = 0",
                 "ok    normalised", "temperature 1.0", "checks ok"]:
        assert line in out, (line, out)
    assert server["url"] in out and "FAIL" not in out
    assert KEY not in out

    # A tokenizer that is not the student's: caught by the preflight (exit 1, the check names the token).
    other = tmp_path / "other_tokenizer"
    tok = AutoTokenizer.from_pretrained(server["path"])
    tok.add_tokens(["<not-in-student>"])
    tok.save_pretrained(other)
    bad = write_config(tmp_path / "bad.yaml", tiny_world, {"rev_teacher": server_teacher(server, path=str(other))},
                       algorithm={"objective": "pg", "teacher_top_k": server["vocab"]})
    assert main(["teachers", "check", bad]) == 1
    out = capsys.readouterr().out
    assert "FAIL  tokenizer" in out and "<not-in-student>" in out and "1 FAILED" in out
    # A top-k beyond the vocabulary is refused before anything is contacted (exit 2, one line).
    too_big = write_config(tmp_path / "too_big.yaml", tiny_world, {"rev_teacher": server_teacher(server)},
                           algorithm={"objective": "pg", "teacher_top_k": server["vocab"] + 36})
    assert main(["teachers", "check", too_big]) == 2
    err = capsys.readouterr().err
    assert f"teacher_top_k={server['vocab'] + 36} is above the vocabulary size {server['vocab']}" in err


def test_train_with_server_teacher(server, tiny_world, ray_local, tmp_path):
    d = tiny_world["dir"]
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "train.yaml", tiny_world, {
        "add_teacher": {"path": f"{d}/teachers/add", "domains": ["add"]},
        "rev_teacher": server_teacher(server),
        "sort_teacher": {"path": f"{d}/teachers/sort", "domains": ["sort"]},
    }, logging={"run_dir": str(run)})
    assert main(["train", cfg, "trainer.steps=3"]) == 0
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "actor/grad_norm" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    rev = [m.get("mopd/teacher_kl/rev") for m in steps]
    assert all(v is not None and math.isfinite(v) for v in rev), rev
    assert any(v > 0 for v in rev)
    result = json.loads((run / "result.json").read_text())
    assert math.isfinite(result["after"]["rev"]["teacher_kl"])
    saved = (run / "config.yaml").read_text()
    assert KEY_ENV in saved and KEY not in saved  # the config names the key's variable, never the key
