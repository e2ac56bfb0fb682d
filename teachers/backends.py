"""Teacher backends as a registry: the one place a `teachers.<name>.backend` value gets its meaning. The
config, the placement plan, engine start-up, the preflight and the CLI ask these flags instead of comparing
backend names. Adding a backend is one `register_teacher_backend` (here, or in a module of your own
imported before the config is loaded) plus its tests.

A backend's start function is named as "module:function" and imported when a run starts teachers: the
engine modules import vLLM, Ray and transformers (~3 s), which loading a config must not pay.

The start function's contract: `start(launches, replicas, scheduling)` with `launches` the teachers that
share one placement role (one teacher, or an `actor_group` of a backend that `shares_actor`), `replicas`
their replica count and `scheduling` one Ray scheduling strategy per replica (None for a remote backend);
it returns name -> one actor handle per replica, not waited on. Each handle answers `ready()`, `score(...)`
and the other calls of `teachers.vllm_teacher.TeacherEngine`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class TeacherLaunch:
    """One teacher as its backend's start function receives it."""

    name: str
    config: Any  # its `teachers.<name>` section (mopd.config.TeacherConfig)
    spec: Any  # its engine spec (rollout.types.EngineSpec); None for a remote backend
    max_restarts: int = 0  # how often Ray restarts a dead actor of it (ray.max_restarts)


@dataclass(frozen=True)
class TeacherBackend:
    name: str
    start: str  # "module:function", see the module docstring
    describe: str  # a few words for tables and messages
    # Served outside the run's cluster (one URL per replica): no placement bundle, no model folder (`path` is
    # only the tokenizer source), its context length is the server's.
    remote: bool = False
    # Teachers naming one `actor_group` share one actor per replica (one process, models side by side).
    shares_actor: bool = False
    # Teachers of one architecture can share a pool of its engines, a swap being an in-place weight load
    # (`teachers.<name>.pool`, teachers/pool.py).
    poolable: bool = False
    # What `mopd teachers check` suggests when a replica does not answer ({name}: the teacher, {where}: the
    # replica, {serve_command}: a command that serves its model).
    start_hint: str = ""
    # Remote backends: "module:function" making the handles in the calling process, without Ray
    # (`mopd teachers check` needs no cluster for them): `client(name, tcfg)` -> one handle per URL.
    client: str | None = None

    def starter(self) -> Callable[..., dict[str, list[Any]]]:
        return _resolve(self.start)

    def clients(self, name: str, tcfg: Any) -> list[Any]:
        if self.client is None:
            raise ValueError(f"teacher backend {self.name!r} has no in-process client")
        return _resolve(self.client)(name, tcfg)


TEACHER_BACKENDS: dict[str, TeacherBackend] = {}


def register_teacher_backend(name: str, **fields: Any) -> TeacherBackend:
    if name in TEACHER_BACKENDS:
        raise ValueError(f"teacher backend {name!r} is already registered")
    TEACHER_BACKENDS[name] = backend = TeacherBackend(name=name, **fields)
    return backend


def get_teacher_backend(name: str) -> TeacherBackend:
    try:
        return TEACHER_BACKENDS[str(getattr(name, "value", name))]
    except KeyError:
        raise ValueError(f"unknown teacher backend {name!r}; registered: {sorted(TEACHER_BACKENDS)}") from None


def _resolve(target: str) -> Callable[..., Any]:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


register_teacher_backend(
    "vllm", start="teachers.vllm_teacher:start_vllm_teachers", describe="an in-cluster vLLM engine actor per replica",
    poolable=True,
    start_hint="the in-cluster engine did not start: check teachers.{name}.path (a model folder vLLM can load) and "
               "memory (rollout.kv_cache_gb, rollout.gpu_memory_utilization)")
register_teacher_backend(
    "vllm_server", start="teachers.http_teacher:start_server_teachers", remote=True,
    client="teachers.http_teacher:server_clients", describe="a `vllm serve` you run; one URL per replica",
    start_hint="start it with `{serve_command}` or fix teachers.{name}.urls")
register_teacher_backend(
    "hf", start="teachers.hf_teacher:start_hf_teachers", shares_actor=True,
    describe="a transformers forward in a Ray actor per replica (teachers of one actor_group share it)",
    start_hint="the hf teacher actor did not start: check teachers.{name}.path (a model folder transformers can "
               "load with AutoModelForCausalLM) and memory (teachers.{name}.dtype, the bundle's CPUs/GPUs)")
