"""A teacher pool: K vLLM engines serve N >= K teachers of one architecture (`teacher_pools.<pool>`,
`teachers.<name>.pool`).

Why: every dedicated teacher engine holds a whole engine's memory (and, on GPUs, whole GPUs) while it is
idle most of a step. Teachers of one architecture differ only in their weights, so an engine can become
another teacher by an in-place weight load, the same `reload_weights` (+ the CPU MoE repack) the student's
weight sync uses. Each teacher's weights are read from disk once, into Ray's object store (shared memory);
a swap is then a copy from there into the engine's parameters, not a load from disk.

Never scoring with the wrong weights: every scoring call names its teacher and the engine refuses a name
that is not the one whose weights it holds (`TeacherIdentityError`). The driver-side `TeacherPool` only
schedules: before each scoring call it submits `load_teacher(name)` to the same engine (a no-op when
resident), so an engine that Ray restarted with its first teacher is put right by the engine itself.
Scheduling is LRU: a teacher already resident scores there; otherwise the least recently used engine swaps.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from safetensors import safe_open

from rollout.actors import at, engine_actor
from rollout.moe_sync import repack_cpu_moe_experts
from rollout.types import EngineSpec
from rollout.vllm_engine import quiet_partial_reload
from teachers.vllm_teacher import ScoreBatch, TeacherEngine

POOL_POLICIES = ("lru",)

# config.json keys that do not change what a model computes from given weights: the rest must be equal for
# one engine to serve both teachers by a weight load.
_NOT_ARCHITECTURE = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "torch_dtype",
                     "dtype", "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


class TeacherIdentityError(RuntimeError):
    """A pooled engine was asked to score as a teacher whose weights it does not hold."""


# ------------------------------------------------------------------------------------------- architecture
def architecture(path: str) -> dict[str, Any]:
    """What decides whether two model folders can share an engine: their config.json less bookkeeping keys."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in _NOT_ARCHITECTURE}


def architecture_mismatch(paths: dict[str, str]) -> str | None:
    """None when every teacher (name -> model folder) has one architecture; else which teacher differs from
    the first in which config.json keys (first values: the first teacher's)."""
    names = list(paths)
    if len(names) < 2:
        return None
    ref = architecture(paths[names[0]])
    for name in names[1:]:
        arch = architecture(paths[name])
        first = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size")
        diff = sorted((k for k in set(ref) | set(arch) if ref.get(k) != arch.get(k)),
                      key=lambda k: (first.index(k) if k in first else len(first), k))
        if diff:
            shown = ", ".join(f"{k} ({ref.get(k)!r} vs {arch.get(k)!r})" for k in diff[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            return f"teacher '{name}' differs from '{names[0]}' in {shown}{more}"
    return None


# ------------------------------------------------------------------------------------------- weights
def read_weights(path: str) -> dict[str, np.ndarray]:
    """A model folder's tensors as numpy arrays (bf16/fp16 kept bit-exact as int16 views with the dtype in
    the key's suffix), which Ray's object store holds zero-copy: engines read them without a copy of their own."""
    out: dict[str, np.ndarray] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors: a pooled teacher's weights are read from it")
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = fh.get_tensor(name)
                if t.dtype in (torch.bfloat16, torch.float16):
                    out[f"{name}|{str(t.dtype).removeprefix('torch.')}"] = t.view(torch.int16).numpy()
                else:
                    out[name] = t.numpy()
    return out


def weight_items(store: dict[str, np.ndarray]) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from `read_weights`' arrays, without copying (the engine's load copies)."""
    for key, arr in store.items():
        name, _, dtype = key.partition("|")
        with warnings.catch_warnings():  # object-store arrays are read-only; the engine only reads them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        yield name, (t.view(getattr(torch, dtype)) if dtype else t)


def weights_nbytes(store: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in store.values())


# ------------------------------------------------------------------------------------------- the engine
class PooledTeacherEngine(TeacherEngine):
    """A teacher engine that can become any teacher of its pool by an in-place weight load.

    `weights`: teacher name -> its `read_weights` arrays, or an object-store ref to them (in a Ray actor);
    the engine starts as `teacher`, loaded from `model_path` (that teacher's folder) by vLLM itself."""

    def __init__(self, model_path: str, *, teacher: str, weights: dict[str, Any], **kw: Any) -> None:
        super().__init__(model_path, **kw)
        self.teacher = teacher
        self.weights = dict(weights)
        self.swaps = 0
        self._last_swap = (False, 0.0)

    def ready(self) -> dict:
        return {**super().ready(), "teacher": self.teacher, "pool_teachers": sorted(self.weights)}

    def resident(self) -> str:
        return self.teacher

    def load_teacher(self, name: str) -> dict:
        """Make `name` this engine's teacher (a no-op when it already is): its weights copied from the object
        store into the engine's parameters, the CPU MoE experts repacked as after the student's sync."""
        if name not in self.weights:
            raise TeacherIdentityError(f"teacher {name!r} is not in this pool (it holds {sorted(self.weights)})")
        if name == self.teacher:
            self._last_swap = (False, 0.0)
            return {"swapped": False, "swap_s": 0.0, "teacher": name}
        t0 = time.perf_counter()
        store = self.weights[name]
        if isinstance(store, ray.ObjectRef):
            store = ray.get(store)
        items = list(weight_items(store))
        self.teacher = ""  # half-loaded weights are nobody's: a failure below leaves the engine refusing scores
        with quiet_partial_reload():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        self.llm.apply_model(functools.partial(repack_cpu_moe_experts, loaded=[k for k, _ in items]))
        self.teacher = name
        self.swaps += 1
        self._last_swap = (True, time.perf_counter() - t0)
        return {"swapped": True, "swap_s": self._last_swap[1], "teacher": name}

    def score(self, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0,
              teacher: str | None = None) -> ScoreBatch:
        if teacher is None or teacher != self.teacher:
            raise TeacherIdentityError(
                f"this pooled engine holds teacher {self.teacher or '(none: a swap failed)'!r}'s weights and was "
                f"asked to score as {teacher!r}: refused (load_teacher({teacher!r}) must come first)")
        out = super().score(sequences, prompt_lens, top_k)
        out.swapped, out.swap_s = self._last_swap
        self._last_swap = (False, 0.0)
        return out

    def generate(self, *args: Any, teacher: str | None = None, **kw: Any) -> Any:
        if teacher is None or teacher != self.teacher:
            raise TeacherIdentityError(f"this pooled engine holds teacher {self.teacher!r}, asked to generate as "
                                       f"{teacher!r}: refused")
        return super().generate(*args, **kw)


# ------------------------------------------------------------------------------------------- the scheduler
class TeacherPool:
    """The driver's view of one pool: which engine holds which teacher (a mirror; the engines are the
    truth), LRU choice of the engine a teacher scores on, and the calls that swap and score."""

    def __init__(self, name: str, engines: list[Any], resident: list[str], teachers: list[str],
                 refs: dict[str, Any] | None = None, weight_bytes: dict[str, int] | None = None) -> None:
        self.name, self.engines, self.teachers = name, list(engines), list(teachers)
        self.resident = list(resident)
        self.refs = refs or {}  # keeps the object-store copies alive for swaps and actor restarts
        self.weight_bytes = weight_bytes or {}
        self._used = [0] * len(engines)
        self._clock = 0
        self._lock = threading.Lock()

    def order(self, names: Iterable[str]) -> list[str]:
        """A step's teachers, resident ones first (they score while the others swap in), then the rest."""
        names = list(names)
        return sorted(names, key=lambda n: (n not in self.resident, names.index(n)))

    def engine_for(self, teacher: str) -> int:
        """The engine `teacher` scores on: where it is resident, else the least recently used one."""
        if teacher in self.resident:
            return self.resident.index(teacher)
        return min(range(len(self.engines)), key=lambda i: self._used[i])

    def pick(self, teacher: str) -> tuple[int, bool]:
        """Choose `teacher`'s engine and mark it used and holding `teacher`: (engine index, whether it swaps)."""
        if teacher not in self.teachers:
            raise TeacherIdentityError(f"teacher {teacher!r} is not in pool {self.name!r} ({self.teachers})")
        i = self.engine_for(teacher)
        self._clock += 1
        self._used[i] = self._clock
        swaps = self.resident[i] != teacher
        self.resident[i] = teacher
        return i, swaps

    def submit(self, teacher: str, method: str, *args: Any, **kw: Any) -> Any:
        """`load_teacher(teacher)` then `method(..., teacher=teacher)` on one engine, submitted together under a
        lock so no other call can come between them on that engine; returns the second call's ref. The load
        goes out even when the mirror says the teacher is resident: the engine decides (a no-op if it is)."""
        with self._lock:
            i, _ = self.pick(teacher)
            eng = self.engines[i]
            eng.load_teacher.remote(teacher)
            return getattr(eng, method).remote(*args, teacher=teacher, **kw)

    def handle(self, teacher: str) -> PooledTeacherHandle:
        return PooledTeacherHandle(self, teacher)

    def residency(self) -> dict[str, str]:
        return {f"{self.name}[{i}]": t for i, t in enumerate(self.resident)}

    def sync_resident(self) -> None:
        """Re-read which teacher each engine holds (after Ray restarted one)."""
        with self._lock:
            self.resident = ray.get([e.resident.remote() for e in self.engines])


class _Call:
    def __init__(self, pool: TeacherPool, teacher: str, method: str) -> None:
        self.pool, self.teacher, self.method = pool, teacher, method

    def remote(self, *args: Any, **kw: Any) -> Any:
        if self.method == "ready":
            return self.pool.engines[0].ready.remote()
        return self.pool.submit(self.teacher, self.method, *args, **kw)


class PooledTeacherHandle:
    """What the step loop holds for a pooled teacher: `score`/`generate`/`ready` like a teacher actor's, each
    call routed to an engine of the pool that first loads this teacher. Lives in the driver (not pickled)."""

    def __init__(self, pool: TeacherPool, teacher: str) -> None:
        self.pool, self.teacher = pool, teacher
        self._mopd_teacher = teacher
        self.ready = _Call(pool, teacher, "ready")
        self.score = _Call(pool, teacher, "score")
        self.generate = _Call(pool, teacher, "generate")


def start_teacher_pool(name: str, launches: list[Any], engines: int,
                       scheduling: list[Any] | None = None) -> TeacherPool:
    """`engines` engine actors for the pool's teachers (`launches`: teachers.backends.TeacherLaunch, config
    order); engine i starts as teacher i. Every teacher's weights go into the object store once, here."""
    paths = {t.name: t.spec.model_path for t in launches}
    problem = architecture_mismatch(paths)
    if problem:
        raise ValueError(f"teacher_pools.{name}: its teachers must share one architecture: {problem}")
    stores = {n: read_weights(p) for n, p in paths.items()}
    refs = {n: ray.put(s) for n, s in stores.items()}
    sizes = {n: weights_nbytes(s) for n, s in stores.items()}
    del stores
    names = [t.name for t in launches]
    actors = []
    for i in range(engines):
        spec: EngineSpec = launches[i].spec
        actors.append(engine_actor(PooledTeacherEngine, spec, at(scheduling, i)).remote(
            spec.model_path, teacher=names[i], weights=refs, max_top_k=spec.max_top_k, **spec.engine_kwargs()))
    return TeacherPool(name, actors, names[:engines], names, refs, sizes)
