"""`mopd plan CONFIG [overrides] [--node cpus=N,gpus=M ...]`: where every actor of a run would go, checked
against a cluster shape before anything starts (no Ray cluster is started or joined).

The bundles come from `mopd.placement.plan_bundles` (what `mopd train` reserves) and are assigned to nodes
by `mopd.placement.place_on_nodes` with `ray.placement_strategy`. The nodes are, in this order: the
`--node` options; the live nodes of the running cluster at `ray.address` (read through Ray's state API,
nothing is scheduled); else the private local cluster `mopd train` would start here (`ray.num_cpus` CPUs and
the GPUs this machine shows). Exit 0 with the table, or 2 with one `mopd: error:` line naming the bundle
that does not fit, what the nodes have and the keys to lower.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mopd.cli.common import DEFAULT_CONFIG
from mopd.cli.common import config_from_args as _cfg
from mopd.config import ConfigError, MopdConfig
from teachers.backends import get_teacher_backend

if TYPE_CHECKING:
    from mopd.placement import Node, NodePlan

_COUNT = re.compile(r"\s*(\d+)\s*[xX]\s*(.*)")


def parse_nodes(specs: list[str]) -> list[Node]:
    """`cpus=32,gpus=8` per node; `2xcpus=32,gpus=8` for two alike. Keys: cpus, gpus (default 0)."""
    from mopd.placement import Node

    nodes: list[Node] = []
    for spec in specs:
        m = _COUNT.fullmatch(spec)
        count, body = (int(m.group(1)), m.group(2)) if m else (1, spec)
        values: dict[str, float] = {}
        for item in (p.strip() for p in body.split(",") if p.strip()):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not sep or key not in ("cpus", "gpus") or key in values or not number >= 0 or number == float("inf"):
                raise ConfigError(f"--node {spec!r}: {item!r} is not allowed; allowed: cpus=N,gpus=M (each once, "
                                  "numbers >= 0; gpus defaults to 0), optionally prefixed with a count: "
                                  "2xcpus=32,gpus=8")
            values[key] = number
        if "cpus" not in values or count < 1:
            raise ConfigError(f"--node {spec!r}: allowed: cpus=N[,gpus=M] with a count >= 1 if one is given "
                              "(e.g. --node cpus=32,gpus=8 or --node 2xcpus=32,gpus=8)")
        nodes += [Node(f"node{len(nodes) + k}", values["cpus"], values.get("gpus", 0.0)) for k in range(count)]
    return nodes


def local_gpus(environ: dict[str, str] | None = None, dev: Path = Path("/dev")) -> int:
    """GPUs a private cluster on this machine would see: CUDA_VISIBLE_DEVICES if set, else /dev/nvidiaN."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)])


def ray_nodes(address: str) -> list[Node]:
    """The alive nodes of the running cluster at `address` (GCS address or dashboard URL) and their totals."""
    from mopd.placement import Node
    from mopd.ray_cluster import force_loopback, is_loopback

    host = re.sub(r"^\w+://", "", address).rsplit(":", 1)[0]
    if is_loopback(host):
        force_loopback()  # else Ray rewrites 127.0.0.1 to this machine's external address
    try:
        from ray.util.state import list_nodes

        states = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - any failure to reach the cluster is the same fix for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"cannot read the nodes of the Ray cluster at ray.address={address!r} ({first}): start "
                          "the cluster, fix ray.address, or declare the nodes with --node cpus=N,gpus=M") from None
    nodes = []
    for s in sorted(states, key=lambda s: (not _get(s, "is_head_node"), str(_get(s, "node_ip")))):
        res = _get(s, "resources_total") or {}
        name = f"{_get(s, 'node_ip')}{' (head)' if _get(s, 'is_head_node') else ''}"
        nodes.append(Node(name, float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))))
    if not nodes:
        raise ConfigError(f"the Ray cluster at ray.address={address!r} has no alive nodes")
    return nodes


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def cluster_nodes(cfg: MopdConfig, specs: list[str]) -> tuple[list[Node], str]:
    """The nodes to plan onto and where their shape came from."""
    from mopd.placement import Node

    if specs:
        return parse_nodes(specs), "--node"
    if cfg.ray.address:
        return ray_nodes(cfg.ray.address), f"the Ray cluster at ray.address={cfg.ray.address}"
    gpus = local_gpus()
    return ([Node("local", float(cfg.ray.num_cpus), float(gpus))],
            f"the private local cluster mopd train starts here (ray.num_cpus={cfg.ray.num_cpus}, {gpus} GPUs seen)")


def _n(x: float) -> str:
    return f"{x:g}"


def plan_table(cfg: MopdConfig, placed: NodePlan, source: str) -> str:
    """Bundles per role, then per node: which actor goes where and the node's use against its capacity."""
    from mopd.placement import POOL_ROLE, bundle_labels, engine_tp, teacher_roles

    plan, labels = placed.plan, bundle_labels(placed.plan)
    groups = teacher_roles(cfg)
    lines = [f"placement plan: {len(plan.bundles)} bundles, ray.placement_strategy={placed.strategy}, "
             f"{len(placed.nodes)} node(s) from {source}", ""]
    rows = [("role", "count", "CPU", "GPU", "TP", "sized by")]
    for role, idx in plan.roles.items():
        b = plan.bundles[idx[0]]
        name = f"{role} ({', '.join(groups[role])})" if "_group:" in role or role.startswith(POOL_ROLE) else role
        tp = "-" if role == "trainer" or role.startswith("hf_group:") else str(engine_tp(cfg, role))
        rows.append((name, str(len(idx)), _n(b.get("CPU", 0.0)), _n(b.get("GPU", 0.0)), tp, plan.sources[role]))
    lines += _columns(rows)
    lines += pool_lines(cfg, plan)
    for j, node in enumerate(placed.nodes):
        used, cap = placed.used(j), node.capacity()
        lines += ["", f"{node.name}: CPU {_n(used.get('CPU', 0.0))}/{_n(cap['CPU'])}, "
                      f"GPU {_n(used.get('GPU', 0.0))}/{_n(cap['GPU'])}"]
        here = placed.bundles_on(j)
        lines += [f"  #{i:<3} {labels[i]:<28} CPU {_n(plan.bundles[i].get('CPU', 0.0)):>5}  "
                  f"GPU {_n(plan.bundles[i].get('GPU', 0.0)):>3}" for i in here] or ["  (nothing)"]
    remote = [(n, t) for n, t in cfg.teachers.items() if get_teacher_backend(t.backend).remote]
    if remote:
        lines.append("")
        lines += [f"teacher:{n}: remote: {', '.join(t.urls)} ({t.backend}: nothing reserved)" for n, t in remote]
    need = plan.demand()
    cpus, gpus = sum(n.cpus for n in placed.nodes), sum(n.gpus for n in placed.nodes)
    lines += ["", f"total: CPU {_n(need.get('CPU', 0.0))}/{_n(cpus)}, GPU {_n(need.get('GPU', 0.0))}/{_n(gpus)}"]
    return "\n".join(lines)


# What one quickstart-sized vLLM engine process adds to a run's summed PSS on CPU beyond its KV cache and weights:
# benchmarks/teacher_pool.py measured 5.88 GB with seven engines and 3.50 GB with three (README, "Many teachers"),
# ~0.6 GB per engine at rollout.kv_cache_gb=0.125. The estimate of what each engine a pool saves frees on CPU.
CPU_ENGINE_RUNTIME_GB = 0.46


def pool_lines(cfg: MopdConfig, plan: Any) -> list[str]:
    """Per teacher pool: which engines may hold which teachers, and what the pool saves against an engine per
    teacher (bundles; on CPU an estimate of resident memory, less the weights the object store keeps)."""
    from mopd.placement import POOL_ROLE

    out = []
    for role, idx in plan.roles.items():
        if not role.startswith(POOL_ROLE):
            continue
        pool = role.removeprefix(POOL_ROLE)
        names = [n for n, t in cfg.teachers.items() if t.pool == pool]
        k, n = len(idx), len(names)
        b = plan.bundles[idx[0]]
        sizes = {t: _weights_gb(cfg.teachers[t].path) for t in names}
        out += ["", f"{role}: {k} engine(s) for {n} teachers, policy {cfg.teacher_pools[pool].policy}; "
                    f"each of {role}[0..{k - 1}] may hold any of: {', '.join(names)}; at start "
                    + ", ".join(f"[{i}] holds {t}" for i, t in enumerate(names[:k]))]
        saved = {key: (n - k) * v for key, v in b.items()}
        line = f"  saves {n - k} engine(s) against one per teacher: bundles {_n(saved.get('CPU', 0.0))} CPU"
        line += f", {_n(saved.get('GPU', 0.0))} GPU"
        if None not in sizes.values():
            weights = sum(sizes.values())
            largest = max(sizes.values())
            per_engine = CPU_ENGINE_RUNTIME_GB + cfg.rollout.kv_cache_gb * 2**30 / 1e9 + largest
            line += (f"; on CPU ~{(n - k) * per_engine - weights:.2f} GB resident ({n - k} x ~{per_engine:.2f} GB per "
                     f"engine, less {weights * 1e3:.1f} MB of teacher weights kept once in the object store; an estimate)")
        out.append(line)
    return out


def _weights_gb(path: str) -> float | None:
    files = list(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    return sum(f.stat().st_size for f in files) / 1e9 if files else None


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]) - 1)]
    return ["  ".join(c.rjust(w) if 0 < k < len(widths) else c.ljust(w) for k, (c, w) in
                      enumerate(zip(r[:-1], widths, strict=True))) + "  " + r[-1] for r in rows]


def cmd_plan(args: argparse.Namespace) -> int:
    from mopd.placement import place_on_nodes, plan_bundles

    cfg = _cfg(args)
    nodes, source = cluster_nodes(cfg, args.node or [])
    placed = place_on_nodes(plan_bundles(cfg), cfg.ray.placement_strategy, nodes)
    print(plan_table(cfg, placed, source))
    return 0


def add_parsers(subparsers: Any) -> None:
    """Register `plan` on the CLI's subparsers."""
    sp = subparsers.add_parser("plan", help="where each actor of a run would go on a cluster, without starting "
                                            "anything; exit 2 if the cluster cannot hold it")
    sp.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="experiment YAML")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ray.placement_strategy=SPREAD")
    sp.add_argument("--node", action="append", metavar="[Nx]cpus=C,gpus=G",
                    help="a node of the cluster to plan onto (repeat per node; 2xcpus=32,gpus=8 for two alike); "
                         "default: the nodes of ray.address, else the private local cluster")
    sp.set_defaults(fn=cmd_plan)
