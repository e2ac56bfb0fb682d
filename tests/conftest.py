"""Shared fixtures: a tiny quickstart world (built by the project's own code) and a loopback Ray
cluster. Both are session-scoped: engines and worlds are the slow parts of this suite."""

from __future__ import annotations

import os
import sys
import time

import pytest

import mopd.world  # noqa: F401 - registers the world: config section that configs/quickstart.yaml has

# One thread: engine actors and the test process share two cores; oversubscription costs 10-100x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Fixtures that start engines, build worlds or run a Ray cluster: a test that uses one is `slow`, so the
# fast lane (`make test-fast`, `-m "not slow"`) holds only pure and in-process tests.
SLOW_FIXTURES = {"tiny_world", "ray_local", "ray_head"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small world: same code path as the quickstart, far fewer steps (accuracy is not the point)."""
    from mopd.world.build import build_world
    from mopd.world.config import WorldConfig

    cfg = WorldConfig(dir=str(tmp_path_factory.mktemp("world")), seed=0, train_rows_per_domain=300,
                      eval_rows_per_domain=32, teacher_steps=40, teacher_steps_by_domain={"add": 40},
                      student_steps=20)
    info = build_world(cfg)
    info["dir"] = cfg.dir
    return info


@pytest.fixture(scope="session")
def ray_local():
    from mopd.ray_cluster import init_ray

    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _live_ray_objects() -> tuple[set[str], set[str]]:
    """The live non-detached actors and the placement groups of the cluster this process is connected to."""
    import ray
    import ray._private.state as state

    actors = {a for a, info in state.actors().items() if info["State"] != "DEAD" and not info["IsDetached"]}
    groups = {g for g, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}
    return actors, groups


def _connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(autouse=True)
def _no_leaked_ray_actors(request):
    """A test that fails halfway can leave actors and placement groups that hold the session cluster's two CPUs:
    every later test's actors would then wait for them, and one failure would become a run of failures and a
    hang. What a test created and left alive is killed after it (fixtures of wider scope are set up before
    this one, so their actors are kept), and said."""
    before = _live_ray_objects() if _connected() else (set(), set())
    yield
    if not _connected():
        return
    import ray
    from ray.util.placement_group import PlacementGroup

    actors, groups = _live_ray_objects()
    actors, groups = actors - before[0], groups - before[1]
    if not (actors or groups):
        return
    worker = ray._private.worker.global_worker  # ray.kill wants a handle; an unnamed actor has none but its id
    for actor_id in actors:
        try:
            worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)
        except Exception as e:  # noqa: BLE001 - died meanwhile
            print(f"conftest: could not kill actor {actor_id}: {e}", file=sys.stderr)
    for group_id in groups:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(a & b for a, b in zip(_live_ray_objects(), (actors, groups), strict=True)):
        time.sleep(0.1)  # a kill takes effect a moment later; the next test should find the CPUs free
    print(f"conftest: {request.node.nodeid} left {len(actors)} actor(s) and {len(groups)} placement "
          "group(s) alive: removed", file=sys.stderr)
