"""The weight-sync group (rollout/weight_group.py) on its own: bucket plans, and a real gloo group of a sender
and two receivers (threads of this process, on loopback) that moves every tensor bit for bit."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from rollout.weight_group import ALIGN, WeightGroup, drain, open_store, plan_buckets

HOST = "127.0.0.1"


def test_plan_buckets_keeps_order_fills_up_to_the_limit_and_sends_a_large_tensor_alone():
    sizes = [40, 8, 100, 3, 1000, 0, 5, 60]
    plan = plan_buckets(sizes, 128)
    assert [i for idx, _, _ in plan for i in idx] == list(range(len(sizes)))  # every tensor once, in order
    for idx, offs, size in plan:
        assert all(o % ALIGN == 0 for o in offs)
        ends = [o + sizes[i] for i, o in zip(idx, offs, strict=True)]
        assert size == ends[-1] and all(e <= o for e, o in zip(ends, offs[1:], strict=False))  # no overlap
        assert size <= 128 or len(idx) == 1  # over the limit only alone
    assert ([1000] in [[sizes[i] for i in idx] for idx, _, _ in plan])
    assert len(plan_buckets(sizes, 1)) == len(sizes)  # each alone
    assert len(plan_buckets(sizes, 10**9)) == 1


def _group(world: int, fn_by_rank) -> list:
    """Run `fn_by_rank[r](group)` for every rank in threads of a fresh group; their results by rank."""
    store = open_store(HOST, world, timeout_s=30)
    out: list = [None] * world
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        try:
            g = (WeightGroup(store, 0, world, "gloo", HOST, join_timeout_s=30, op_timeout_s=30) if rank == 0 else
                 WeightGroup.connect(HOST, store.port, rank, world, "gloo", HOST, join_timeout_s=30, op_timeout_s=30))
            out[rank] = fn_by_rank[rank](g)
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("bucket_bytes", [1, 64, 10**6])
def test_two_engines_receive_every_tensor_exactly(bucket_bytes):
    g = torch.Generator().manual_seed(0)
    sent = {"a.weight": torch.randn(7, 5, generator=g), "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4), "bf": torch.randn(33, generator=g).to(torch.bfloat16),
            "ids": torch.arange(11, dtype=torch.int64), "mask": torch.tensor([True, False, True]),
            "big": torch.randn(300, generator=g), "strided": torch.randn(6, 4, generator=g).t()}

    def receive(group):
        names, tensors = group.receive()
        got = {k: v.clone() for k, v in tensors}
        drain(tensors)
        return names, got

    out = _group(3, [lambda group: group.send(sent.items(), bucket_bytes), receive, receive])
    assert out[0] >= sum(v.numel() * v.element_size() for v in sent.values())
    for names, got in out[1:]:
        assert names == list(sent)
        for k, v in sent.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def test_a_receiver_that_stops_early_still_drains_every_bucket_and_the_group_stays_usable():
    sent = {f"t{i}": torch.full((64,), float(i)) for i in range(6)}

    def receive_partly(group):
        names, tensors = group.receive()
        first = next(tensors)[1].clone()
        drain(tensors)
        again = dict(group.receive()[1])  # the next sync arrives whole
        return first, again

    def send_twice(group):
        group.send(sent.items(), 256)
        return group.send(sent.items(), 256)

    _, (first, again) = _group(2, [send_twice, receive_partly])
    assert torch.equal(first, sent["t0"])
    assert all(torch.equal(again[k], v) for k, v in sent.items())


def test_the_group_leaves_torch_default_group_alone():
    def default_group():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else None

    before = default_group()  # None, unless an earlier test in this process formed one
    _group(2, [lambda g: g.send([("x", torch.ones(3))], 1024), lambda g: dict(g.receive()[1])])
    assert default_group() == before
