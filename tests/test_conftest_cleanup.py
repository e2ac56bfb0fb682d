"""The suite's own guard (conftest `_no_leaked_ray_actors`): what one test leaves alive on the session cluster
is removed before the next, so one failure cannot starve every later test of the cluster's two CPUs."""

from __future__ import annotations

import time

import ray

_LEFT: list = []  # handles a test keeps past its end, as a failed test's frames would


def test_a_test_leaves_actors_and_a_placement_group_holding_every_cpu(ray_local):
    @ray.remote(num_cpus=0.75)
    class Holder:
        def ping(self) -> int:
            return 1

    _LEFT.extend(Holder.remote() for _ in range(2))
    ray.get([a.ping.remote() for a in _LEFT])
    group = ray.util.placement_group([{"CPU": 0.5}])
    ray.get(group.ready())
    _LEFT.append(group)
    assert ray.available_resources().get("CPU", 0) == 0


def test_the_next_test_finds_the_cluster_free(ray_local):
    assert len(_LEFT) == 3  # the handles are still held: only the guard can have freed the CPUs
    deadline = time.monotonic() + 30  # the cluster's view of free CPUs lags the deaths a little
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
