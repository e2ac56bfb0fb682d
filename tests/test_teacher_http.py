"""The `vllm serve` client against a real loopback HTTP server that behaves like vLLM's OpenAI routes, or
fails the ways real servers fail: down, erroring, overloaded, hung, answering garbage. Each failure must
come back as its own message with its own fix, within a bounded time, and the API key must reach the
server and nothing else (not Ray's logs)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from teachers.http_teacher import ServerTeacher, TeacherServerError, client_kwargs, serve_command

REPO = Path(__file__).resolve().parents[1]
VOCAB, MAX_LOGPROBS, MML = 64, 8, 48
KEY_ENV = "MOPD_TEST_HTTP_TEACHER_KEY"


def rank(tok: int, pos: int) -> int:
    """The fake teacher's distribution at a position: token `pos` ranks first, then pos+1, ..."""
    return (tok - pos) % VOCAB + 1


def logprob(tok: int, pos: int) -> float:
    return -0.1 * rank(tok, pos)


class FakeVLLM:
    """vLLM's `/v1/models`, `/tokenize` and `/v1/completions` (with `prompt_logprobs`) on 127.0.0.1.

    `script[route]` lists what to do with successive requests to that route (the last repeats):
    "ok", "garbage" (HTTP 200, not JSON), "hang" (never answer), ("slow", seconds), or
    ("status", code, headers, json_body).
    """

    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.script: dict[str, list[Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0
        self.release = threading.Event()  # wakes hung handlers at teardown
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.handle(self, None)

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                fake.handle(self, json.loads(self.rfile.read(n)) if n else None)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up on a hung request closed its socket: expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, path: str) -> int:
        return sum(r["path"] == path for r in self.requests)

    def handle(self, h: BaseHTTPRequestHandler, body: dict | None) -> None:
        with self.lock:
            self.requests.append({"method": h.command, "path": h.path, "body": body, "port": h.client_address[1],
                                  "auth": h.headers.get("Authorization")})
            steps = self.script.get(h.path, ["ok"])
            action = steps.pop(0) if len(steps) > 1 else steps[0]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.key is not None and h.headers.get("Authorization") != f"Bearer {self.key}":
                return self.send(h, 401, {"error": {"message": "Unauthorized", "code": 401}})
            if action == "hang":
                self.release.wait(60)
                h.close_connection = True
                return None
            if action == "garbage":
                return self.send(h, 200, b"<html>502 Bad Gateway</html>")
            if isinstance(action, tuple) and action[0] == "status":
                return self.send(h, action[1], action[3], action[2])
            if isinstance(action, tuple) and action[0] == "slow":
                time.sleep(action[1])
            code, out = self.answer(h.path, body)
            return self.send(h, code, out)
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer(self, path: str, body: dict | None) -> tuple[int, dict]:
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "fake-teacher", "object": "model",
                                                     "max_model_len": MML}]}
        if path == "/tokenize":
            return 200, {"tokens": [ord(c) % VOCAB for c in body["prompt"]], "count": len(body["prompt"]),
                         "max_model_len": MML}
        assert path == "/v1/completions", path
        k = body.get("prompt_logprobs")
        want = VOCAB if k == -1 else k
        if want > MAX_LOGPROBS:
            return 400, {"object": "error", "error": {
                "message": f"Requested prompt logprobs of {want}, which is greater than max allowed: {MAX_LOGPROBS}",
                "type": "BadRequestError", "code": 400}}
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices = []
        for i, seq in enumerate(prompts):
            entries: list[dict | None] = [None]
            for pos in range(1, len(seq)):
                toks = {seq[pos]} | {(pos + r) % VOCAB for r in range(want)}
                entries.append({str(t): {"logprob": logprob(t, pos), "rank": rank(t, pos), "decoded_token": "x"}
                                for t in toks})
            choices.append({"index": i, "text": "x", "prompt_logprobs": entries, "finish_reason": "length"})
        return 200, {"id": "cmpl-1", "object": "text_completion", "model": "fake-teacher", "choices": choices}

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, body: dict | bytes, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture
def fake() -> Iterator[FakeVLLM]:
    srv = FakeVLLM()
    yield srv
    srv.close()


def client(url: str, **kw: Any) -> ServerTeacher:
    args = {"path": "some/teacher", "max_retries": 2, "backoff_s": 0.01, "timeout_s": 5.0, "connect_timeout_s": 1.0,
            **kw}
    return ServerTeacher("t", url, **args)


SEQS = [[1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12], [3, 3, 3, 3, 3, 3], [7, 1]]
PLENS = [2, 3, 1, 4, 1]


def expected(top_k: int) -> list[tuple[list[float], list[list[int]]]]:
    out = []
    for seq, plen in zip(SEQS, PLENS, strict=True):
        lps = [logprob(seq[p], p) for p in range(plen, len(seq))]
        ids = [[(p + r) % VOCAB for r in range(top_k)] for p in range(plen, len(seq))] if top_k else []
        out.append((lps, ids))
    return out


def test_scores_with_one_handshake_over_kept_alive_connections(fake):
    with client(fake.url, max_concurrency=1, request_batch_size=2) as t:
        info = t.ready()
        assert "error" not in info, info
        assert (info["served_model"], info["max_model_len"], info["vocab_size"], info["max_logprobs"]) == \
            ("fake-teacher", MML, VOCAB, MAX_LOGPROBS)
        for top_k in (0, 3, 0):
            got = t.score(SEQS, PLENS, top_k)
            assert [(s.logprobs, [] if s.topk_ids is None else s.topk_ids.tolist()) for s in got] == expected(top_k)  # floats survive JSON exactly
        assert t.tokenize("abc") == [ord(c) % VOCAB for c in "abc"]
    assert fake.count("/v1/models") == 1  # the handshake is per client, not per request
    assert fake.count("/v1/completions") == 1 + 3 * 3  # one probe, then 3 calls of 3 batches
    assert len({r["port"] for r in fake.requests}) == 1  # one kept-alive connection throughout
    assert all(r["body"]["model"] == "fake-teacher" for r in fake.requests if r["body"])


def test_max_concurrency_requests_in_flight(fake):
    with client(fake.url, max_concurrency=3, request_batch_size=1) as t:
        t.connect()
        fake.script["/v1/completions"] = [("slow", 0.3)]
        got = t.score(SEQS, PLENS, 0)
    assert [s.logprobs for s in got] == [lps for lps, _ in expected(0)]
    assert fake.max_in_flight == 3


def test_server_error_is_retried_then_reported_with_its_message(fake):
    with client(fake.url, max_retries=2) as t:
        t.connect()
        fake.script["/v1/completions"] = [("status", 500, {}, {"error": {"message": "CUDA error: device lost"}})]
        with pytest.raises(TeacherServerError) as e:
            t.score(SEQS[:1], PLENS[:1])
    msg = str(e.value)
    assert f"teacher 't' at {fake.url} answered HTTP 500: CUDA error: device lost" in msg
    assert "after 3 attempts" in msg and "check the server log" in msg
    assert fake.count("/v1/completions") == 1 + 1 + 2  # probe, then 1 + max_retries


@pytest.mark.parametrize("retry_after", ["0", "1"])
def test_overloaded_once_is_retried_once_after_retry_after(fake, retry_after):
    with client(fake.url, max_retries=3, backoff_s=0.0) as t:
        t.connect()
        fake.script["/v1/completions"] = [("status", 429, {"Retry-After": retry_after},
                                           {"error": {"message": "too many requests"}}), "ok"]
        t0 = time.perf_counter()
        got = t.score(SEQS[:1], PLENS[:1])
        elapsed = time.perf_counter() - t0
    assert got[0].logprobs == expected(0)[0][0]
    assert fake.count("/v1/completions") == 1 + 2  # probe, 429, 200: exactly one retry
    assert elapsed >= float(retry_after)


def test_overloaded_after_retries_says_what_to_lower(fake):
    with client(fake.url, max_retries=1) as t:
        t.connect()
        fake.script["/v1/completions"] = [("status", 429, {"Retry-After": "0"}, {"error": {"message": "busy"}})]
        with pytest.raises(TeacherServerError, match=r"is overloaded \(HTTP 429: busy, still after 2 attempts\)") as e:
            t.score(SEQS[:1], PLENS[:1])
    assert "teachers.t.max_concurrency" in str(e.value) and "add replicas" in str(e.value)
    assert fake.count("/v1/completions") == 1 + 2


def test_malformed_json_is_a_clear_error_not_a_retry(fake):
    with client(fake.url) as t:
        t.connect()
        fake.script["/v1/completions"] = ["garbage"]
        with pytest.raises(TeacherServerError) as e:
            t.score(SEQS[:1], PLENS[:1])
    msg = str(e.value)
    assert f"teacher 't' at {fake.url} answered POST /v1/completions with HTTP 200 and a body that is not JSON" in msg
    assert "502 Bad Gateway" in msg and "vLLM OpenAI server" in msg
    assert fake.count("/v1/completions") == 1 + 1
    fake.script["/v1/models"] = ["garbage"]
    with client(fake.url) as t:
        assert "not JSON" in t.ready()["error"]


def test_hung_server_fails_within_connect_plus_read_timeout(fake):
    connect_s, timeout_s = 0.5, 1.0
    with client(fake.url, timeout_s=timeout_s, connect_timeout_s=connect_s, max_retries=3) as t:
        t.connect()
        fake.script["/v1/completions"] = ["hang"]
        t0 = time.perf_counter()
        with pytest.raises(TeacherServerError) as e:
            t.score(SEQS[:1], PLENS[:1])
        elapsed = time.perf_counter() - t0
    msg = str(e.value)
    assert f"teacher 't' at {fake.url} timed out after 1 s" in msg and "teachers.t.timeout_s" in msg
    assert elapsed < 3 * (connect_s + timeout_s)  # one attempt, not 1 + max_retries of them
    assert fake.count("/v1/completions") == 1 + 1


def test_refused_connection_is_unreachable_with_the_serve_command():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with client(url, max_retries=1) as t:
        err = t.ready()["error"]
    assert err.startswith(f"teacher 't' at {url} is unreachable after 2 attempts (ConnectError")
    assert f"; start it with `{serve_command('some/teacher', url)}`" in err and "teachers.t.urls" in err


def test_api_key_is_sent_as_bearer_from_the_named_variable(monkeypatch):
    key = "sk-test-" + secrets.token_hex(8)
    srv = FakeVLLM(key=key)
    try:
        monkeypatch.delenv(KEY_ENV, raising=False)
        with client(srv.url, api_key_env=KEY_ENV) as t:
            err = t.ready()["error"]
        assert f"environment variable {KEY_ENV}" in err and "not set" in err and "teachers.t.api_key_env" in err
        assert srv.requests == []  # nothing sent without the key

        monkeypatch.setenv(KEY_ENV, "wrong-" + key)
        with client(srv.url, api_key_env=KEY_ENV) as t:
            err = t.ready()["error"]
        assert "refused the API key (HTTP 401" in err and f"${KEY_ENV}" in err and key not in err

        monkeypatch.setenv(KEY_ENV, key)
        srv.requests.clear()
        with client(srv.url, api_key_env=KEY_ENV) as t:
            assert "error" not in t.ready()
            t.score(SEQS, PLENS, 0)
            assert key not in repr(t)
        assert srv.requests and all(r["auth"] == f"Bearer {key}" for r in srv.requests)
    finally:
        srv.close()


def test_client_kwargs_reads_connect_timeout_when_the_config_has_it():
    class Old:  # a TeacherConfig from before connect_timeout_s
        path, served_model, timeout_s, api_key_env = "p", None, 7.0, None
        max_retries, max_concurrency, request_batch_size = 1, 2, 3

    class New(Old):
        connect_timeout_s = 0.25

    assert client_kwargs(Old)["connect_timeout_s"] == 5.0
    t = ServerTeacher("t", "http://127.0.0.1:1", **client_kwargs(New))
    assert (t.connect_timeout_s, t.timeout_s) == (0.25, 7.0)
    t.close()


# A driver of its own: Ray allows one cluster per process, and the suite's shared cluster may be up.
RAY_DRIVER = r"""
import os, sys
import ray
from teachers.http_teacher import start_server_teacher

url, key_env, temp_dir, canary = sys.argv[1:5]

class Cfg:
    path, urls, served_model, timeout_s, connect_timeout_s = "some/teacher", [url], None, 60.0, 5.0
    api_key_env, max_retries, max_concurrency, request_batch_size = key_env, 0, 2, 2

@ray.remote(num_cpus=0)
class Canary:
    def value(self):
        return os.environ.get("MOPD_TEST_CANARY")

ray.init(num_cpus=1, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
         log_to_driver=False)
try:
    actor = start_server_teacher("secret_teacher", Cfg)[0]
    info = ray.get(actor.ready.remote())
    assert "error" not in info, info
    print("SCORES", [s.logprobs for s in ray.get(actor.score.remote([[1, 2, 3, 4]], [2], 0))])
    # The positive control: what goes through a runtime env does land in Ray's files.
    c = Canary.options(runtime_env={"env_vars": {"MOPD_TEST_CANARY": canary}}).remote()
    print("CANARY", ray.get(c.value.remote()) == canary)
finally:
    ray.shutdown()
"""


@pytest.mark.slow
def test_api_key_never_reaches_ray_logs():
    key = "sk-planted-" + secrets.token_hex(16)
    canary = "canary-" + secrets.token_hex(16)
    srv = FakeVLLM(key=key)
    temp_dir = tempfile.mkdtemp(prefix="mopd-ray-")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", KEY_ENV)}
    env.update({KEY_ENV: key, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"})
    try:
        proc = subprocess.run([sys.executable, "-c", RAY_DRIVER, srv.url, KEY_ENV, temp_dir, canary], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"SCORES [{[logprob(3, 2), logprob(4, 3)]}]" in proc.stdout and "CANARY True" in proc.stdout
        # The actor had the key (the server checks it) without Ray carrying it.
        assert srv.requests and all(r["auth"] == f"Bearer {key}" for r in srv.requests)
        assert key not in proc.stdout + proc.stderr
        files = [p for p in Path(temp_dir).rglob("*") if p.is_file() and not p.is_symlink()]
        assert len(files) > 5, files
        found = {"key": [], "canary": []}
        for p in files:
            try:
                data = p.read_bytes()
            except OSError:
                continue
            for what, value in (("key", key), ("canary", canary)):
                if value.encode() in data:
                    found[what].append(str(p.relative_to(temp_dir)))
        assert found["canary"], "the positive control is in no Ray file: this test could not see a leak"
        assert found["key"] == [], f"the API key is written in clear to {found['key']}"
    finally:
        srv.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
