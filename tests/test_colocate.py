"""Colocated mode: the student engine (`rollout.colocate`) and small hf teachers (`teachers.<name>.colocate`)
live in the trainer's actor. Real steps through Ray: the engine samples with the trainer's weights after every
in-process sync (pi_old == mu), no student or teacher actor of its own exists, the teachers score like their
own actors would, and the loop trains, checkpoints and (one-step-off) pipelines as in dedicated mode."""

from __future__ import annotations

import pytest
from test_train_loop import world_overrides

from mopd.config import ConfigError, load_config
from mopd.jsonl import read_metrics
from mopd.placement import plan_bundles
from mopd.train import train

TEACHERS = ("add_teacher", "rev_teacher", "sort_teacher")


def colocated(world: dict, tmp_path, *extra: str) -> list[str]:
    return world_overrides(world) + [
        f"logging.run_dir={tmp_path}/run", "rollout.colocate=true", "algorithm.objective=reverse_kl",
        "algorithm.teacher_top_k=-1", *(f"teachers.{t}.backend=hf" for t in TEACHERS),
        *(f"teachers.{t}.colocate=true" for t in TEACHERS), *extra]


def test_config_and_placement_of_colocated_engines():
    qs = "configs/quickstart.yaml"
    plan = plan_bundles(load_config(qs, ["rollout.colocate=true", "teachers.add_teacher.backend=hf",
                                         "teachers.add_teacher.colocate=true"]))
    assert set(plan.roles) == {"teacher:rev_teacher", "teacher:sort_teacher", "trainer"}  # no student bundle
    assert "also holds the student engine and teachers add_teacher" in plan.sources["trainer"]
    # Without the trainer (mopd round, mopd teachers check) they get bundles of their own.
    alone = plan_bundles(load_config(qs, ["rollout.colocate=true"]), trainer=False)
    assert "student" in alone.roles
    with pytest.raises(ConfigError, match=r"teachers\.add_teacher\.colocate.*false for backend vllm.*hf"):
        load_config(qs, ["teachers.add_teacher.colocate=true"])
    with pytest.raises(ConfigError, match=r"teachers\.add_teacher\.colocate.*replicas 2.*one replica"):
        load_config(qs, ["teachers.add_teacher.backend=hf", "teachers.add_teacher.colocate=true",
                         "teachers.add_teacher.replicas=2"])
    with pytest.raises(ConfigError, match=r"rollout\.colocate.*trainer\.num_workers=2.*one accelerate trainer"):
        load_config(qs, ["rollout.colocate=true", "trainer.num_workers=2"])
    with pytest.raises(ConfigError, match=r"rollout\.num_engines.*got 2.*1 with rollout\.colocate"):
        load_config(qs, ["rollout.colocate=true", "rollout.num_engines=2"])


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_everything_in_the_trainer_actor_trains_and_tracks_the_trainer(tiny_world, ray_local, tmp_path, staleness):
    # R3 on in the synchronous run: the colocated engine's routing capture works in the trainer's process too.
    cfg = load_config("configs/quickstart.yaml", colocated(tiny_world, tmp_path, "trainer.steps=5", "trainer.lr=5e-3",
                                                            "trainer.save_every=5", f"trainer.max_staleness={staleness}",
                                                            f"algorithm.r3={str(staleness == 0).lower()}"))
    lines: list[str] = []
    result = train(cfg, log=lines.append)
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "actor/grad_norm" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]
    for m in steps:
        if staleness == 0:  # every sample drawn by the weights the trainer holds: pi_old == mu
            assert m["training/rollout_probs_diff_max"] < 1e-3, m
            assert m["rollout/staleness_max"] == 0
            assert m["r3/router_agreement"] == 1.0 and m["r3/replayed_frac"] > 0.5, m
        else:  # one step behind, corrected by IcePop; never further
            assert m["rollout/staleness_max"] <= 1
        assert m["icepop/masked_frac"] == 0.0 if staleness == 0 else True
    # One process holds the trainer, the engine and the teachers: no engine actor of its own was started.
    first = steps[0]
    assert "perf/mem_gb/trainer" in first
    assert not any(k.startswith(("perf/mem_gb/student", "perf/mem_gb/teacher")) for k in first), sorted(first)
    assert steps[-1]["mopd/teacher_kl"] < steps[0]["mopd/teacher_kl"]
    assert set(result["teacher"]) == {"add", "rev", "sort"}  # the colocated teachers generate for the eval too
    assert (tmp_path / "run" / "checkpoints" / "step_5" / "state.json").is_file()
    assert any(line.endswith("weight sync: in-process (colocated)") for line in lines), lines  # no group
