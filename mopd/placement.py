"""One Ray placement group per run: a bundle per student engine, per local teacher replica and for the
trainer, sized from the config, so that a run either gets every resource it needs before step 1 or
stops with a message that says what was asked for and what the cluster has.

Roles name the bundles: "student", "teacher:<name>", "hf_group:<group>" (teachers sharing one actor),
"teacher_pool:<pool>" (the engines of a teacher pool), "trainer".
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
from teachers.backends import get_teacher_backend


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
    """Bundles from the config alone (no Ray): engines first, then teachers in config order, then the trainer.
    Without the trainer (`mopd round`, `mopd teachers check`) what would live in its actor (`colocate`) gets
    bundles of its own."""
    r = cfg.rollout
    plan = BundlePlan()
    if not (trainer and r.colocate):
        plan.add("student", r.num_engines, r.num_cpus_per_engine, r.num_gpus_per_engine,
                 "rollout.num_engines x rollout.num_cpus_per_engine/num_gpus_per_engine")
    for role, names in teacher_roles(cfg, trainer).items():
        ts = [cfg.teachers[n] for n in names]  # one teacher, or an hf actor group: its largest bundle
        cpus = max(r.num_cpus_per_engine if t.num_cpus is None else t.num_cpus for t in ts)
        gpus = max(r.num_gpus_per_engine if t.num_gpus is None else t.num_gpus for t in ts)
        keys = "/".join(f"teachers.{n}" for n in names)
        if role.startswith(POOL_ROLE):
            pool = role.removeprefix(POOL_ROLE)
            plan.add(role, cfg.teacher_pools[pool].engines, cpus, gpus,
                     f"teacher_pools.{pool}.engines x {keys}.num_cpus/num_gpus (default: rollout.num_*_per_engine)")
            continue
        plan.add(role, ts[0].replicas, cpus, gpus,
                 f"{keys}.replicas x {keys}.num_cpus/num_gpus (default: rollout.num_*_per_engine)")
    if trainer:
        hosts = [x for x, on in (("the student engine", r.colocate),
                                 ("teachers " + ", ".join(colocated_teachers(cfg)), colocated_teachers(cfg))) if on]
        plan.add("trainer", cfg.trainer.num_workers, cfg.trainer.num_cpus, cfg.trainer.num_gpus,
                 "trainer.num_workers x trainer.num_cpus/num_gpus" + (f" (also holds {' and '.join(hosts)})"
                                                                      if hosts else ""))
    return plan


POOL_ROLE = "teacher_pool:"  # the bundles of a teacher pool's engines: teacher_pool:<pool>


def engine_tp(cfg: MopdConfig, role: str) -> int:
    """The tensor_parallel_size of the engines filling `role` ("student", "teacher:<name>", "teacher_pool:<pool>")."""
    names = teacher_roles(cfg).get(role) or teacher_roles(cfg, trainer=False).get(role) or []
    tps = [cfg.teachers[n].tensor_parallel_size for n in names]
    return max([t for t in tps if t is not None] or [cfg.rollout.tensor_parallel_size])


def colocated_teachers(cfg: MopdConfig) -> list[str]:
    """The teachers held in the trainer's actor (`teachers.<name>.colocate`)."""
    return [n for n, t in cfg.teachers.items() if t.colocate]


def teacher_roles(cfg: MopdConfig, trainer: bool = True) -> dict[str, list[str]]:
    """Bundle role -> the teachers whose actors fill it, in config order: "teacher:<name>" for a teacher of
    its own, "<backend>_group:<group>" for teachers sharing one actor (`actor_group`, e.g. hf_group:small); a
    remote teacher (vllm_server) runs elsewhere, and a colocated one in the trainer's actor, so they have none."""
    roles: dict[str, list[str]] = {}
    for name, t in cfg.teachers.items():
        backend = get_teacher_backend(t.backend)
        if backend.remote or (trainer and t.colocate):
            continue
        if t.pool is not None:
            roles.setdefault(f"{POOL_ROLE}{t.pool}", []).append(name)
            continue
        group = t.actor_group if backend.shares_actor else None
        roles.setdefault(f"teacher:{name}" if group is None else f"{t.backend}_group:{group}", []).append(name)
    return roles


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

    def where(self) -> dict[str, str]:
        """Bundle label (`student[0]`, `trainer[1]`, ...) -> the id of the node Ray placed it on."""
        table = ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {})
        return {label: table.get(i, "?") for i, label in enumerate(bundle_labels(self.plan))}

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


# ---------------------------------------------------------------------------------------------- dry-run plan
class PlacementError(ConfigError):
    """A declared cluster cannot hold the run's placement group; the message names the bundle, what the
    nodes have and the config keys that size it."""


@dataclass
class Node:
    """One node of a declared (or read) cluster: what Ray would report as its CPU and GPU resources."""

    name: str
    cpus: float
    gpus: float = 0.0

    def capacity(self) -> dict[str, float]:
        return {"CPU": float(self.cpus), "GPU": float(self.gpus)}


@dataclass
class NodePlan:
    """Which node each bundle of `plan` lands on (`node_of[i]`: index into `nodes`)."""

    plan: BundlePlan
    strategy: str
    nodes: list[Node]
    node_of: list[int]

    def bundles_on(self, node: int) -> list[int]:
        return [i for i, n in enumerate(self.node_of) if n == node]

    def used(self, node: int) -> dict[str, float]:
        return _sum(self.plan.bundles[i] for i in self.bundles_on(node))


def bundle_labels(plan: BundlePlan) -> list[str]:
    """The actor each bundle holds: `student[0]`, `teacher:<name>[1]`, `hf_group:<group>[0]`, `trainer` (or
    `trainer[r]` for data-parallel rank r)."""
    labels = [""] * len(plan.bundles)
    for role, idx in plan.roles.items():
        for k, i in enumerate(idx):
            labels[i] = role if role == "trainer" and len(idx) == 1 else f"{role}[{k}]"
    return labels


def place_on_nodes(plan: BundlePlan, strategy: str, nodes: list[Node]) -> NodePlan:
    """Assign every bundle to a node the way `ray.placement_strategy` would, without Ray: a first-fit
    sketch of Ray's semantics, bundles largest first (GPUs, then CPUs) as Ray's scheduler orders them.

    PACK: each bundle on the first node with room (fill a node before the next). SPREAD: round-robin,
    each bundle on the next node after the previous one's that has room. STRICT_PACK: every bundle on the
    first node that holds them all. STRICT_SPREAD: every bundle on a node of its own (an exact matching).
    Raises `PlacementError` naming the bundle that does not fit, what the nodes have and the keys to lower.
    First fit may refuse a PACK/SPREAD group that a cleverer packing would place; Ray's own choice of
    nodes may differ from this one where several fit.
    """
    if not nodes:
        raise PlacementError("no nodes to plan onto (declare one: --node cpus=N,gpus=M)")
    bundles = plan.bundles
    order = sorted(range(len(bundles)), key=lambda i: (-bundles[i].get("GPU", 0.0), -bundles[i].get("CPU", 0.0), i))
    free = [n.capacity() for n in nodes]
    node_of = [-1] * len(bundles)
    if strategy == "STRICT_PACK":
        need = plan.demand()
        home = next((j for j, n in enumerate(nodes) if _fits(need, n.capacity())), None)
        if home is None:
            raise PlacementError(_refusal(
                plan, strategy, nodes, free, f"STRICT_PACK puts all {len(bundles)} bundles on one node, which "
                f"needs {_fmt(need)}, but no node has that", list(plan.sources)))
        return NodePlan(plan, strategy, nodes, [home] * len(bundles))
    if strategy == "STRICT_SPREAD":
        return NodePlan(plan, strategy, nodes, _strict_spread(plan, nodes, order))
    cursor = 0
    for i in order:
        starts = range(len(nodes)) if strategy == "PACK" else [(cursor + k) % len(nodes) for k in range(len(nodes))]
        j = next((j for j in starts if _fits(bundles[i], free[j])), None)
        if j is None:
            raise PlacementError(_no_room(plan, strategy, nodes, free, node_of, i))
        node_of[i] = j
        free[j] = {k: v - bundles[i].get(k, 0.0) for k, v in free[j].items()}
        cursor = j + 1
    return NodePlan(plan, strategy, nodes, node_of)


def _strict_spread(plan: BundlePlan, nodes: list[Node], order: list[int]) -> list[int]:
    """One bundle per node: a bipartite matching (augmenting paths), so a refusal means none exists."""
    bundles, labels = plan.bundles, bundle_labels(plan)
    free = [n.capacity() for n in nodes]
    if len(bundles) > len(nodes):
        counts = [f"{role} {len(idx)}" for role, idx in plan.roles.items()]
        raise PlacementError(_refusal(
            plan, "STRICT_SPREAD", nodes, free, f"STRICT_SPREAD puts each of the {len(bundles)} bundles "
            f"({', '.join(counts)}) on a node of its own, but the cluster has {len(nodes)} node(s)",
            list(plan.sources), extra="or set ray.placement_strategy=SPREAD (or PACK)"))
    holder: list[int | None] = [None] * len(nodes)  # node -> bundle

    def augment(i: int, seen: set[int]) -> bool:
        """A node for bundle i: a free one first (first fit), else one whose bundle can move elsewhere."""
        fits = [j for j, n in enumerate(nodes) if j not in seen and _fits(bundles[i], n.capacity())]
        for j in sorted(fits, key=lambda j: holder[j] is not None):
            seen.add(j)
            moved = holder[j]
            if moved is None or augment(moved, seen):
                holder[j] = i
                return True
        return False

    for i in order:
        if not augment(i, set()):
            role = _role_of(plan, i)
            fits = [n.name for n in nodes if _fits(bundles[i], n.capacity())]
            why = (f"bundle {labels[i]} {_fmt(bundles[i])} needs a node of its own, but "
                   + (f"only {', '.join(fits)} can hold it and the larger bundles took them" if fits
                      else "no node can hold it"))
            raise PlacementError(_refusal(plan, "STRICT_SPREAD", nodes, free, why, [role]))
    node_of = [-1] * len(bundles)
    for j, i in enumerate(holder):
        if i is not None:
            node_of[i] = j
    return node_of


def _no_room(plan: BundlePlan, strategy: str, nodes: list[Node], free: list[dict[str, float]],
             node_of: list[int], i: int) -> str:
    labels = bundle_labels(plan)
    b = plan.bundles[i]
    role = _role_of(plan, i)
    if not any(_fits(b, n.capacity()) for n in nodes):
        why = f"bundle {labels[i]} needs {_fmt(b)} but no node is that large"
        return _refusal(plan, strategy, nodes, free, why, [role])
    placed = [labels[k] for k, n in enumerate(node_of) if n >= 0]
    why = (f"bundle {labels[i]} needs {_fmt(b)} but no node has that left after {', '.join(placed)} "
           f"(the whole group needs {_fmt(plan.demand())})")
    return _refusal(plan, strategy, nodes, free, why, [role, *(r for r in plan.sources if r != role)])


def _refusal(plan: BundlePlan, strategy: str, nodes: list[Node], free: list[dict[str, float]], why: str,
             roles: list[str], extra: str = "") -> str:
    have = "; ".join(f"{n.name} {_fmt(n.capacity())}" + (f" (free {_fmt(f)})" if f != n.capacity() else "")
                     for n, f in zip(nodes, free, strict=True))
    keys = "; ".join(f"{plan.sources[r]} ({r})" for r in roles)
    return (f"the cluster cannot hold the placement group ({strategy}: {plan.describe()}): {why}. "
            f"The nodes have: {have}. Lower {keys}{'; ' + extra if extra else ''}; or declare more or "
            "larger nodes (--node cpus=N,gpus=M).")


def _role_of(plan: BundlePlan, i: int) -> str:
    return next(role for role, idx in plan.roles.items() if i in idx)


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(v <= free.get(k, 0.0) + 1e-9 for k, v in need.items())


def _sum(bundles: Any) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    return total
