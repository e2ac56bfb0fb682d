"""`mopd plan` and `mopd.placement.place_on_nodes`: bundles onto declared nodes per placement strategy,
refusals that name the bundle and the keys, and the GPU cluster config. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from mopd.cli import main
from mopd.cli.plan import cluster_nodes, local_gpus, parse_nodes
from mopd.config import ConfigError, load_config
from mopd.placement import Node, PlacementError, bundle_labels, place_on_nodes, plan_bundles

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QS = str(CONFIGS / "quickstart.yaml")
GPU = str(CONFIGS / "gpu_cluster.yaml")
TWO_X8 = [Node("node0", 32, 8), Node("node1", 32, 8)]


# The placement-logic tests below use the cluster config with one 8-GPU trainer worker (one big bundle makes
# the packing cases interesting); test_gpu_config_places_eight_trainer_workers covers the config as shipped.
ONE_TRAINER = ("trainer.num_workers=1", "trainer.num_gpus=8", "trainer.num_cpus=16")


def placed_labels(cfg_path: str, nodes: list[Node], *overrides: str) -> list[list[str]]:
    """Per node, the actors it holds (in bundle order)."""
    cfg = load_config(cfg_path, [*(ONE_TRAINER if cfg_path == GPU else ()), *overrides])
    placed = place_on_nodes(plan_bundles(cfg), cfg.ray.placement_strategy, nodes)
    labels = bundle_labels(placed.plan)
    return [[labels[i] for i in placed.bundles_on(j)] for j in range(len(nodes))]


def test_quickstart_plans_onto_one_two_cpu_node():
    cfg = load_config(QS)
    placed = place_on_nodes(plan_bundles(cfg), cfg.ray.placement_strategy, [Node("local", 2)])
    assert placed.node_of == [0, 0, 0, 0, 0]
    assert placed.used(0) == {"CPU": 2.0}
    assert bundle_labels(placed.plan) == ["student[0]", "teacher:add_teacher[0]", "teacher:rev_teacher[0]",
                                          "teacher:sort_teacher[0]", "trainer"]
    with pytest.raises(PlacementError, match=r"no node has that left after .*trainer\.num_cpus/num_gpus"):
        place_on_nodes(plan_bundles(cfg), "PACK", [Node("local", 1.5)])


def test_gpu_config_loads_with_the_cluster_shape(capsys):
    assert main(["config", "show", GPU]) == 0
    assert "backend: deepspeed" in capsys.readouterr().out
    cfg = load_config(GPU)
    assert (cfg.trainer.backend, cfg.trainer.zero_stage, cfg.trainer.precision) == ("deepspeed", 3, "bf16")
    assert cfg.student.dtype == "bfloat16" and (cfg.trainer.num_workers, cfg.trainer.num_gpus) == (8, 1)
    assert (cfg.rollout.num_engines, cfg.rollout.num_gpus_per_engine) == (4, 2)
    assert {n: (t.backend, t.replicas, t.api_key_env) for n, t in cfg.teachers.items()} == {
        "math_teacher": ("vllm_server", 2, "MATH_TEACHER_API_KEY"),
        "code_teacher": ("vllm_server", 1, "CODE_TEACHER_API_KEY")}
    # Server teachers reserve nothing: engines and the trainer are the whole group.
    assert plan_bundles(cfg).demand() == {"CPU": 32.0, "GPU": 16.0}


def test_gpu_config_places_eight_trainer_workers():
    cfg = load_config(GPU)
    placed = place_on_nodes(plan_bundles(cfg), cfg.ray.placement_strategy, TWO_X8)
    labels = bundle_labels(placed.plan)
    on = [[labels[i] for i in placed.bundles_on(j)] for j in range(2)]
    assert on == [[f"student[{i}]" for i in range(4)], [f"trainer[{r}]" for r in range(8)]]


def test_gpu_config_on_two_8_gpu_nodes_pack_and_spread():
    students = [f"student[{i}]" for i in range(4)]
    # Largest bundle first (Ray's order): the 8-GPU trainer fills node0, the engines the other node.
    assert placed_labels(GPU, TWO_X8) == [["trainer"], students]
    assert placed_labels(GPU, TWO_X8, "ray.placement_strategy=SPREAD") == [["trainer"], students]
    # A group that fits one node: PACK keeps it there, SPREAD goes round-robin over the nodes.
    small = ["trainer.num_gpus=4", "rollout.num_engines=2"]
    assert placed_labels(GPU, TWO_X8, *small) == [["student[0]", "student[1]", "trainer"], []]
    assert placed_labels(GPU, TWO_X8, *small, "ray.placement_strategy=SPREAD") == [
        ["student[1]", "trainer"], ["student[0]"]]
    assert placed_labels(GPU, TWO_X8, *small, "ray.placement_strategy=STRICT_PACK") == [
        ["student[0]", "student[1]", "trainer"], []]
    with pytest.raises(PlacementError, match=r"STRICT_PACK puts all 5 bundles on one node, which needs "
                                             r"\{CPU: 32, GPU: 16\}"):
        placed_labels(GPU, TWO_X8, "ray.placement_strategy=STRICT_PACK")


def test_strict_spread_needs_a_node_per_bundle():
    with pytest.raises(PlacementError) as e:
        placed_labels(GPU, TWO_X8, "ray.placement_strategy=STRICT_SPREAD")
    msg = str(e.value)
    assert "each of the 5 bundles (student 4, trainer 1) on a node of its own, but the cluster has 2" in msg
    assert "rollout.num_engines" in msg and "ray.placement_strategy=SPREAD" in msg
    five = [Node(f"n{i}", 32, 8) for i in range(5)]
    assert placed_labels(GPU, five, "ray.placement_strategy=STRICT_SPREAD") == [
        ["trainer"], ["student[0]"], ["student[1]"], ["student[2]"], ["student[3]"]]
    # First fit (largest first) would put the 2-GPU engine on the 4-CPU node and leave the trainer nowhere;
    # the matching finds the one assignment that works.
    odd = ["rollout.num_engines=1", "rollout.num_cpus_per_engine=1", "rollout.num_gpus_per_engine=2",
           "trainer.num_cpus=4", "trainer.num_gpus=1", "ray.placement_strategy=STRICT_SPREAD"]
    assert placed_labels(GPU, [Node("big", 4, 2), Node("small", 1, 2)], *odd) == [["trainer"], ["student[0]"]]


def test_nine_gpus_on_8_gpu_nodes_is_refused_naming_the_keys():
    with pytest.raises(PlacementError) as e:
        placed_labels(GPU, TWO_X8, "trainer.num_gpus=9")
    msg = str(e.value)
    assert "bundle trainer needs {CPU: 16, GPU: 9} but no node is that large" in msg
    assert "node0 {CPU: 32, GPU: 8}; node1 {CPU: 32, GPU: 8}" in msg
    assert "Lower trainer.num_workers x trainer.num_cpus/num_gpus (trainer)" in msg
    with pytest.raises(PlacementError, match=r"bundle student\[0\] needs \{CPU: 4, GPU: 9\}.*"
                                             r"rollout\.num_engines x rollout\.num_cpus_per_engine/num_gpus"):
        placed_labels(GPU, TWO_X8, "rollout.num_gpus_per_engine=9")
    # 2 engines x 2 GPUs + a 5-GPU trainer: 9 GPUs on one 8-GPU node; either role's keys can make it fit.
    with pytest.raises(PlacementError) as e:
        placed_labels(GPU, [Node("node0", 32, 8)], "rollout.num_engines=2", "trainer.num_gpus=5")
    msg = str(e.value)
    assert "bundle student[1] needs {CPU: 4, GPU: 2} but no node has that left after student[0], trainer" in msg
    assert "the whole group needs {CPU: 24, GPU: 9}" in msg and "node0 {CPU: 32, GPU: 8} (free {CPU: 12, GPU: 1})" in msg
    assert "rollout.num_engines x" in msg and "trainer.num_cpus/num_gpus" in msg


def test_hf_group_bundles_are_labelled_with_their_teachers(capsys):
    group = ["teachers.add_teacher.backend=hf", "teachers.add_teacher.actor_group=small",
             "teachers.rev_teacher.backend=hf", "teachers.rev_teacher.actor_group=small"]
    assert placed_labels(QS, [Node("local", 2)], *group) == [
        ["student[0]", "hf_group:small[0]", "teacher:sort_teacher[0]", "trainer"]]
    assert main(["plan", QS, *group, "--node", "cpus=2"]) == 0
    assert "hf_group:small (add_teacher, rev_teacher)" in capsys.readouterr().out


def test_parse_nodes():
    assert parse_nodes(["2xcpus=32,gpus=8", "cpus=4"]) == [Node("node0", 32, 8), Node("node1", 32, 8),
                                                         Node("node2", 4, 0)]
    for bad in ["gpus=8", "cpus=-1", "cpus=1,foo=2", "0xcpus=1", "cpus=inf", "cpus=nan", "cpus=1,cpus=2", "cpus"]:
        with pytest.raises(ConfigError, match="--node"):
            parse_nodes([bad])


def test_local_gpus(tmp_path):
    assert local_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, tmp_path) == 2
    assert local_gpus({"CUDA_VISIBLE_DEVICES": ""}, tmp_path) == 0
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert local_gpus({}, tmp_path) == 2


def test_without_nodes_or_address_the_private_cluster_is_planned(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    nodes, source = cluster_nodes(load_config(QS, ["ray.num_cpus=3"]), [])
    assert nodes == [Node("local", 3, 0)] and "ray.num_cpus=3" in source


def test_cli_prints_the_plan_and_exits_0_or_2(capsys, monkeypatch):
    assert main(["plan", GPU, "--node", "cpus=32,gpus=8", "--node", "cpus=32,gpus=8"]) == 0
    out = capsys.readouterr().out
    assert "ray.placement_strategy=PACK, 2 node(s) from --node" in out
    node0, node1 = out.split("\nnode0: ")[1].split("\nnode1: ")
    assert node0.startswith("CPU 16/32, GPU 8/8") and all(f"student[{i}]" in node0 for i in range(4))
    assert node1.startswith("CPU 16/32, GPU 8/8") and all(f"trainer[{r}]" in node1 for r in range(8))
    assert "student" not in node1 and "trainer" not in node0
    assert "teacher:math_teacher: remote: http://teacher-math-0:8000, http://teacher-math-1:8000" in out
    assert "total: CPU 32/64, GPU 16/16" in out

    assert main(["plan", GPU, "trainer.num_gpus=9", "--node", "2xcpus=32,gpus=8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mopd: error: the cluster cannot hold the placement group")
    assert "trainer.num_cpus/num_gpus" in err[0]

    assert main(["plan", GPU, "--node", "gpus=8"]) == 2
    assert capsys.readouterr().err.startswith("mopd: error: --node 'gpus=8'")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["plan", QS]) == 0  # the private local cluster: ray.num_cpus=2
    assert "local: CPU 2/2, GPU 0/0" in capsys.readouterr().out
    assert main(["plan", QS, "ray.num_cpus=1"]) == 2
    assert "mopd: error: the cluster cannot hold" in capsys.readouterr().err


def test_a_teacher_pool_of_tensor_parallel_engines_on_declared_gpu_nodes(capsys):
    """Six teachers on two TP=2 pool engines: two 2-GPU bundles instead of six, placed on GPU nodes; the plan
    says which engines may hold which teachers, the GPUs saved and TP per engine."""
    six = ["add_teacher", "rev_teacher", "sort_teacher", "t4", "t5", "t6"]
    over = ["rollout.num_gpus_per_engine=2", "rollout.tensor_parallel_size=2", "rollout.num_cpus_per_engine=4",
            "teacher_pools.dense.engines=2", "trainer.num_gpus=1",
            *[f"teachers.{t}.path=/models/t" for t in six[3:]],
            *[f"teachers.{t}.domains=[d{i}]" for i, t in enumerate(six[3:])],
            *[f"teachers.{t}.pool=dense" for t in six]]
    nodes = [Node("node0", 32, 8), Node("node1", 32, 8)]
    assert placed_labels(QS, nodes, *over) == [
        ["student[0]", "teacher_pool:dense[0]", "teacher_pool:dense[1]", "trainer"], []]
    assert main(["plan", QS, *over, "--node", "2xcpus=32,gpus=8"]) == 0
    out = capsys.readouterr().out
    pool_row = next(line for line in out.splitlines() if line.startswith(f"teacher_pool:dense ({', '.join(six)})"))
    student_row = next(line for line in out.splitlines() if line.startswith("student "))
    assert pool_row.split()[7:11] == ["2", "4", "2", "2"]  # count, CPU, GPU, TP after the role and six names
    assert student_row.split()[1:5] == ["1", "4", "2", "2"]
    assert "2 engine(s) for 6 teachers" in out and "[0] holds add_teacher, [1] holds rev_teacher" in out
    assert "saves 4 engine(s) against one per teacher: bundles 16 CPU, 8 GPU" in out
    # A TP engine needs its GPUs in its bundle.
    with pytest.raises(ConfigError, match=r"'rollout.tensor_parallel_size': got 4; allowed: at most "
                                          r"rollout.num_gpus_per_engine=2"):
        load_config(QS, [*over, "rollout.tensor_parallel_size=4"])
