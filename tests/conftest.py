"""Shared fixtures: a tiny quickstart world (built by the project's own code) and a loopback Ray
cluster. Both are session-scoped: engines and worlds are the slow parts of this suite."""

from __future__ import annotations

import os

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
