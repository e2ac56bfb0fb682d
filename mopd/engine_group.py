"""Start the engine actors a run needs (student rollout engines and one actor group per teacher)
from the config, and wait until every engine is up so start-up failures surface before step 1."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from transformers import AutoConfig

from mopd.config import ConfigError, MopdConfig
from mopd.placement import POOL_ROLE, Placement, colocated_teachers, engine_tp, reserve, teacher_roles
from rollout.actors import start_student_engines
from rollout.types import EngineSpec
from teachers.backends import TeacherLaunch, get_teacher_backend
from teachers.hf_teacher import teacher_handle
from teachers.pool import TeacherPool, start_teacher_pool
from teachers.registry import TeacherRegistry


@dataclass
class EngineGroup:
    students: list[Any]
    teachers: dict[str, list[Any]]
    startup_s: float
    engine_startup_s: dict[str, float]
    placement: Placement | None = None  # the run's placement group, removed at shutdown
    # Engines held in the trainer's actors (rollout.colocate, teachers.<name>.colocate): not actors of their own,
    # so they are neither restarted, counted, nor killed as engines (the trainer's own recovery covers them).
    hosted: frozenset[str] = frozenset()
    # Teacher pools (teachers/pool.py) by name: their engines are the actors; the pooled teachers' handles are not.
    pools: dict[str, TeacherPool] = field(default_factory=dict)

    def named_actors(self) -> dict[str, Any]:
        """Every engine actor by a readable name: student[i], teacher:<name>[i], teacher_pool:<pool>[i] (not
        those in the trainer's)."""
        pooled = {n for p in self.pools.values() for n in p.teachers}
        out = {f"student[{i}]": a for i, a in enumerate(self.students)} if "student" not in self.hosted else {}
        out.update({f"teacher:{n}[{i}]": a for n, reps in self.teachers.items()
                    if n not in self.hosted and n not in pooled for i, a in enumerate(reps)})
        out.update({f"{POOL_ROLE}{name}[{i}]": a for name, p in self.pools.items() for i, a in enumerate(p.engines)})
        return out

    def rehost(self, trainer_actors: list[Any]) -> None:
        """A rebuilt trainer's actors now hold the colocated engines."""
        if "student" in self.hosted:
            self.students[:] = trainer_actors  # in place: the batch producer holds this list
        for name in self.teachers:
            if name in self.hosted:
                self.teachers[name][:] = [teacher_handle(trainer_actors[0], name)]

    def pids(self) -> dict[str, int]:
        """Each engine actor's process id (a new one after Ray restarted it)."""
        named = self.named_actors()
        return dict(zip(named, ray.get([a.__ray_call__.remote(_pid) for a in named.values()]), strict=True))

    def wait_restarted(self, before: dict[str, int], timeout_s: float = 900.0) -> tuple[list[str], dict[str, int]]:
        """Wait until every engine answers again: the names of those Ray restarted since `before` was taken,
        and every engine's pid now. An engine that stays dead (its restarts used up) is an error naming it."""
        deadline = time.monotonic() + timeout_s
        now = {name: answer_when_alive(a, _pid, deadline, name) for name, a in self.named_actors().items()}
        restarted = [n for n in now if now[n] != before.get(n)]
        for name, pool in self.pools.items():
            # A restarted pooled engine holds its first teacher again (its constructor's), not the one the
            # driver's mirror last sent it: re-read, so scheduling and `pool/<pool>/resident/*` are the engines'.
            if any(n.startswith(f"{POOL_ROLE}{name}[") for n in restarted):
                pool.sync_resident()
        return restarted, now

    def shutdown(self) -> None:
        for a in self.named_actors().values():
            ray.kill(a)  # teachers sharing one actor kill it more than once: harmless
        if self.placement is not None:
            self.placement.remove()


def _pid(_self: Any) -> int:
    return os.getpid()


def answer_when_alive(actor: Any, fn: Any, deadline: float, name: str) -> Any:
    """`fn(actor)` run in the actor, retried while Ray restarts it (calls fail while it is down)."""
    while True:
        try:
            return ray.get(actor.__ray_call__.remote(fn), timeout=max(1.0, deadline - time.monotonic()))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{name} died and did not come back (ray.max_restarts used up, or its node is "
                                   f"gone): {str(e).splitlines()[0]}") from None
            time.sleep(1.0)


def max_model_len(cfg: MopdConfig) -> int:
    """Engine context: the longest prompt plus the longest response plus the one token a teacher's
    scoring request generates; refused up front if a model cannot hold it."""
    need = cfg.data.max_prompt_tokens + cfg.rollout.response_budget + 1  # multi-turn: the whole trajectory
    # A server teacher's context is its server's (checked by the teacher preflight), not its `path`'s.
    local = [(f"teacher '{n}'", t.path) for n, t in cfg.teachers.items() if not get_teacher_backend(t.backend).remote]
    for name, path in [("student", cfg.student.path), *local]:
        limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        if limit is not None and need > limit:
            raise ConfigError(
                f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) + rollout.max_tokens ({cfg.rollout.max_tokens}, "
                f"or rollout.max_total_tokens ({cfg.rollout.max_total_tokens}) if larger) "
                f"+ 1 = {need} exceeds the {name}'s max_position_embeddings={limit}; lower one of them")
    return need


def engine_spec(cfg: MopdConfig, model_path: str, **fields: Any) -> EngineSpec:
    """An engine's spec from the rollout section, with per-engine `fields` (dtype, resources, top-k ...)."""
    r = cfg.rollout
    dtype = fields.pop("dtype")
    return EngineSpec(model_path=model_path, dtype=str(getattr(dtype, "value", dtype)), seed=cfg.trainer.seed,
                      enforce_eager=r.enforce_eager, gpu_memory_utilization=r.gpu_memory_utilization,
                      omp_threads=r.omp_threads, kv_cache_gb=r.kv_cache_gb, max_restarts=cfg.ray.max_restarts,
                      **{"tensor_parallel_size": r.tensor_parallel_size, **fields})


def student_spec(cfg: MopdConfig, model_path: str, resources: dict[str, float]) -> EngineSpec:
    """The student engine's spec (an engine actor's, or the one a colocated trainer worker builds)."""
    return engine_spec(cfg, model_path, dtype=cfg.rollout.dtype or cfg.student.dtype, max_model_len=max_model_len(cfg),
                       capture_routing=cfg.algorithm.r3 or cfg.algorithm.r3_capture, **resources)


def start_engines(cfg: MopdConfig, registry: TeacherRegistry, placement: Placement | None = None,
                  trainer: Any = None) -> EngineGroup:
    """Engines in their placement-group bundles; without `placement` (no trainer in this run) a group
    holding only the engines' bundles is reserved here. `trainer` (a `RemoteTrainer`): the run's trainer, whose
    actors hold the colocated engines (`rollout.colocate`, `teachers.<name>.colocate`)."""
    t0 = time.perf_counter()
    r = cfg.rollout
    mml = max_model_len(cfg)
    placement = placement or reserve(cfg, trainer=False)
    hosted = set()
    if "student" in placement.plan.roles:
        students = start_student_engines(student_spec(cfg, cfg.student.path, placement.plan.actor_resources("student")),
                                         r.num_engines, placement.strategies("student"))
    else:  # rollout.colocate: the trainer's workers hold them
        students, hosted = list(trainer.actors), {"student"}
    pools: dict[str, TeacherPool] = {}
    teachers = start_teachers(cfg, registry, placement, mml, host=trainer.actor if trainer is not None else None,
                              pools=pools)
    if trainer is not None and "trainer" in placement.plan.roles:
        hosted |= set(colocated_teachers(cfg))
    pooled = {n for p in pools.values() for n in p.teachers}
    names = [f"student[{i}]" for i in range(len(students))] + [
        f"{n}[{i}]" for n, reps in teachers.items() if n not in pooled for i in range(len(reps))] + [
        f"{POOL_ROLE}{name}[{i}]" for name, p in pools.items() for i in range(len(p.engines))]
    ready = [a.engine_ready.remote() if "student" in hosted else a.ready.remote() for a in students]
    ready += [a.ready.remote() for n, reps in teachers.items() if n not in pooled for a in reps]
    ready += [e.ready.remote() for p in pools.values() for e in p.engines]
    try:
        info = ray.get(ready)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"an engine failed to start: {e}") from e
    return EngineGroup(students, teachers, time.perf_counter() - t0,
                       {n: round(i["startup_s"], 2) for n, i in zip(names, info, strict=True)}, placement,
                       frozenset(hosted), pools)


def start_teachers(cfg: MopdConfig, registry: TeacherRegistry, placement: Placement,
                   mml: int | None = None, host: Any = None,
                   pools: dict[str, TeacherPool] | None = None) -> dict[str, list[Any]]:
    """Each placement role's teachers started by their backend (teachers.backends): one actor per replica in
    the role's bundles (teachers of one `actor_group` share it), or, for a remote backend, a client per URL
    that reserves nothing. `host`: trainer rank 0's actor, which holds the colocated teachers when the placement
    has the trainer (their handles address it). A `teacher_pool:<pool>` role starts the pool's engines (added to
    `pools`); its teachers get one handle each that routes to them. Not waited on here."""
    mml = mml or max_model_len(cfg)
    hosting = host is not None and "trainer" in placement.plan.roles
    roles = {name: role for role, names in teacher_roles(cfg, hosting).items() for name in names}
    groups: dict[str, list[TeacherLaunch]] = {}  # role (or the remote teacher's own name) -> its teachers
    out: dict[str, list[Any]] = {}
    for name, spec in registry.teachers.items():
        tcfg, role = cfg.teachers[name], roles.get(name)
        if hosting and tcfg.colocate:
            out[name] = [teacher_handle(host, name)]
            continue
        launch = TeacherLaunch(name, tcfg, None, cfg.ray.max_restarts)
        if role is not None:  # in the cluster: an engine spec in its bundle
            launch.spec = engine_spec(cfg, spec.path, dtype=spec.dtype, max_model_len=mml,
                                      max_top_k=cfg.algorithm.teacher_top_k, tensor_parallel_size=engine_tp(cfg, role),
                                      **placement.plan.actor_resources(role))
        groups.setdefault(role or f"remote:{name}", []).append(launch)
    for role, launches in groups.items():
        if role.startswith(POOL_ROLE):
            pool_name = role.removeprefix(POOL_ROLE)
            pool = start_teacher_pool(pool_name, launches, cfg.teacher_pools[pool_name].engines,
                                      placement.strategies(role))
            if pools is not None:
                pools[pool_name] = pool
            out.update({t.name: [pool.handle(t.name)] for t in launches})
            continue
        backend = get_teacher_backend(launches[0].config.backend)
        out.update(backend.starter()(launches, registry.teachers[launches[0].name].replicas,
                                     placement.strategies(role)))
    return {name: out[name] for name in registry.teachers}
