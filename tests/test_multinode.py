"""Multi-node placement on one machine: Ray's own multi-node simulation (`ray.cluster_utils.Cluster`, two
raylets on loopback) holds the run's placement group with the engines and two data-parallel trainer workers
spread over both nodes, and the loop trains 3 steps through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_train_loop import world_overrides

REPO = Path(__file__).resolve().parents[1]

# A process of its own: the test session's private cluster (`ray_local`) is already initialised in this one.
SCRIPT = """
import json, sys
from mopd.ray_cluster import force_loopback
force_loopback()  # both simulated nodes on 127.0.0.1
import ray
from ray.cluster_utils import Cluster
import mopd.world  # registers the world: config section
from mopd.config import load_config
from mopd.jsonl import read_metrics
from mopd.train import train

if __name__ == "__main__":
    overrides, out = json.loads(sys.argv[1]), sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    lines = []
    try:
        cfg = load_config("configs/quickstart.yaml", overrides + [f"ray.address={cluster.address}"])
        result = train(cfg, log=lines.append)
        steps = [m for m in read_metrics(cfg.logging.run_dir + "/metrics.jsonl") if "actor/grad_norm" in m]
        json.dump({"steps": result["steps"], "log": lines, "nodes": nodes, "records": steps}, open(out, "w"))
    finally:
        ray.shutdown()
        cluster.shutdown()
"""


def test_two_simulated_nodes_hold_engines_and_trainer_workers_and_train(tiny_world, tmp_path):
    teachers = ("add_teacher", "rev_teacher", "sort_teacher")
    overrides = world_overrides(tiny_world) + [
        f"logging.run_dir={tmp_path}/run", "trainer.steps=3", "ray.placement_strategy=SPREAD",
        "trainer.num_workers=2", "trainer.num_cpus=1", "trainer.micro_batch_size=4",
        "algorithm.objective=reverse_kl", "algorithm.teacher_top_k=-1", "ray.placement_timeout_s=120",
        # hf teachers in one actor: four fewer vLLM processes on a 2-core machine
        *(f"teachers.{t}.backend=hf" for t in teachers), *(f"teachers.{t}.actor_group=all" for t in teachers)]
    (tmp_path / "two_nodes.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(tmp_path / "two_nodes.py"), json.dumps(overrides),
                        str(tmp_path / "out.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out["nodes"]) == 2
    assert out["steps"] == 3 and [m["step"] for m in out["records"]] == [1, 2, 3]
    placed = next(line for line in out["log"] if line.startswith("placement: "))
    where = dict(part.rsplit(" on node ", 1) for part in placed.removeprefix("placement: ").split(", "))
    assert where["trainer[0]"] != where["trainer[1]"], placed  # SPREAD: one worker per node
    assert len(set(where.values())) == 2
    # Weight sync over the collective across the two nodes (both on loopback here).
    assert any(line.endswith("weight sync: collective") for line in out["log"]), out["log"]
    for m in out["records"]:
        assert m["actor/grad_norm"] > 0
        assert m["training/rollout_probs_diff_max"] < 1e-3  # rank 0's sync reached the engine on its node or not
