"""One Ray placement group per run: a bundle per student engine, per local teacher replica and for the
trainer, sized from the config, so that a run either gets every resource it needs before step 1 or
stops with a message that says what was asked for and what the cluster has.

Roles name the bundles: "student", "teacher:<name>", "hf_group:<group>" (hf teachers sharing one actor), "trainer".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mopd.config import ConfigError, MopdConfig
from mopd.ray_cluster import cluster_address


@dataclass
class BundlePlan:
    bundles: list[dict[str, float]] = field(default_factory=list)
    roles: dict[str, list[int]] = field(default_factory=dict)  # role -> bundle indices
    sources: dict[str, str] = field(default_factory=dict)  # role -> the config keys that size it

    def add(self, role: str, count: int, cpus: float, gpus: float, source: str) -> None:
        bundle = {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
        start = len(self.bundles)
        self.bundles += [dict(bundle) for _ in range(count)]
        self.roles[role] = list(range(start, start + count))
        self.sources[role] = source

    def actor_resources(self, role: str) -> dict[str, float]:
        """`num_cpus`/`num_gpus` for an actor that fills one of the role's bundles."""
        b = self.bundles[self.roles[role][0]]
        return {"num_cpus": b.get("CPU", 0.0), "num_gpus": b.get("GPU", 0.0)}

    def demand(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def describe(self) -> str:
        parts = []
        for role, idx in self.roles.items():
            parts.append(f"{role} {len(idx)} x {_fmt(self.bundles[idx[0]])}")
        return ", ".join(parts)


def plan_bundles(cfg: MopdConfig, trainer: bool = True) -> BundlePlan:
    """Bundles from the config alone (no Ray): engines first, then teachers in config order, then the trainer."""
    r = cfg.rollout
    plan = BundlePlan()
    plan.add("student", r.num_engines, r.num_cpus_per_engine, r.num_gpus_per_engine,
             "rollout.num_engines x rollout.num_cpus_per_engine/num_gpus_per_engine")
    for role, names in teacher_roles(cfg).items():
        ts = [cfg.teachers[n] for n in names]  # one teacher, or an hf actor group: its largest bundle
        cpus = max(r.num_cpus_per_engine if t.num_cpus is None else t.num_cpus for t in ts)
        gpus = max(r.num_gpus_per_engine if t.num_gpus is None else t.num_gpus for t in ts)
        keys = "/".join(f"teachers.{n}" for n in names)
        plan.add(role, ts[0].replicas, cpus, gpus,
                 f"{keys}.replicas x {keys}.num_cpus/num_gpus (default: rollout.num_*_per_engine)")
    if trainer:
        plan.add("trainer", 1, cfg.trainer.num_cpus, cfg.trainer.num_gpus, "trainer.num_cpus/num_gpus")
    return plan


def teacher_roles(cfg: MopdConfig) -> dict[str, list[str]]:
    """Bundle role -> the teachers whose actors fill it, in config order: "teacher:<name>" for a vLLM or hf
    teacher of its own, "hf_group:<group>" for hf teachers sharing one actor; a vllm_server teacher runs
    elsewhere, so it has none."""
    roles: dict[str, list[str]] = {}
    for name, t in cfg.teachers.items():
        if t.backend == "vllm_server":
            continue
        group = t.actor_group if t.backend == "hf" else None
        roles.setdefault(f"teacher:{name}" if group is None else f"hf_group:{group}", []).append(name)
    return roles


def teacher_role(cfg: MopdConfig, name: str) -> str:
    """The bundle role of teacher `name` (see `teacher_roles`)."""
    return next(role for role, names in teacher_roles(cfg).items() if name in names)


@dataclass
class Placement:
    pg: Any
    plan: BundlePlan
    ready_s: float

    def strategies(self, role: str) -> list[Any] | None:
        """Scheduling strategies for the role's actors, one per bundle; None if the role has no bundles."""
        if role not in self.plan.roles:
            return None
        return [PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)
                for i in self.plan.roles[role]]

    def remove(self) -> None:
        """Frees the bundles; Ray ends any actor still running in them."""
        remove_placement_group(self.pg)


def reserve(cfg: MopdConfig, trainer: bool = True, fixed_cluster: bool | None = None) -> Placement:
    """Create the run's placement group and wait until every bundle is placed.

    A private local cluster can never grow, so a request it cannot hold fails at once; a running cluster
    may be adding nodes, so that one gets `ray.placement_timeout_s`.
    """
    plan = plan_bundles(cfg, trainer)
    strategy = cfg.ray.placement_strategy
    if fixed_cluster is None:
        fixed_cluster = cluster_address(cfg.ray.address) is None
    t0 = time.perf_counter()
    if fixed_cluster:
        problem = _infeasible(plan, strategy, ray.cluster_resources(), len(ray.nodes()))
        if problem:
            raise ConfigError(_message(plan, strategy, problem, ray.available_resources()))
    pg = placement_group(plan.bundles, strategy=strategy, name=f"mopd-{cfg.experiment}")
    if not pg.wait(timeout_seconds=cfg.ray.placement_timeout_s):
        available = ray.available_resources()
        ray.util.remove_placement_group(pg)
        problem = _infeasible(plan, strategy, ray.cluster_resources(), len(ray.nodes())) or (
            f"not placed within ray.placement_timeout_s={cfg.ray.placement_timeout_s:g} s "
            "(other jobs hold the resources, or nodes are still joining)")
        raise ConfigError(_message(plan, strategy, problem, available))
    return Placement(pg, plan, time.perf_counter() - t0)


def _infeasible(plan: BundlePlan, strategy: str, total: dict[str, float], nodes: int) -> str | None:
    """Why the cluster as it is cannot hold the plan, or None."""
    need = plan.demand()
    short = {k: v for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
    if short:
        return f"needs {_fmt(need)} but the cluster has {_fmt({k: total.get(k, 0.0) for k in need})} in all"
    if strategy == "STRICT_SPREAD" and len(plan.bundles) > nodes:
        return f"STRICT_SPREAD puts each of the {len(plan.bundles)} bundles on its own node but the cluster has {nodes}"
    return None


def _message(plan: BundlePlan, strategy: str, problem: str, available: dict[str, float]) -> str:
    keys = "; ".join(f"{role}: {src}" for role, src in plan.sources.items())
    need = plan.demand()
    return (f"placement group ({strategy}: {plan.describe()}) {problem} "
            f"(available now: {_fmt({k: available.get(k, 0.0) for k in need})}). "
            f"Lower the bundle sizes or counts ({keys}), or start the cluster with more resources "
            "(ray.num_cpus for the private local cluster, `ray start --num-cpus/--num-gpus` otherwise).")


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"
