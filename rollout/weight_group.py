"""Weight sync over a collective: trainer rank 0 and the student engines in a `torch.distributed` group of
their own, the weights broadcast bucket by bucket straight into the engines' parameters.

The pattern of OpenRLHF's and verl's `init_weight_update_group`: rank 0 of the trainer opens a TCP store on
its node (the IP Ray uses: loopback on a private cluster, never 0.0.0.0) on a port of its own, and each engine
joins as rank 1..N. The group is a bare gloo (CPU) or NCCL (GPU) backend built on that store. It is never
registered as torch's default group or as a named one, so it cannot collide with the trainer's data-parallel
group or with the world-size-1 group vLLM makes in the engine's process: collectives are called on the backend
object itself, with this group's ranks.

One sync: a header (every tensor's name, dtype and shape, as JSON), then the tensors packed into buckets of
at most `bucket_bytes` (a larger tensor goes alone, uncopied). Both sides derive the buckets from the header, so
only the bytes cross the wire. The receiver is lazy: `WeightGroup.receive` returns an iterator that takes the
next bucket when vLLM's `load_weights` asks for the next tensor, so an engine holds one bucket at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

ALIGN = 16  # bytes: every tensor starts at a multiple of this in its bucket, so a byte slice views as any dtype
# Forming the group: every member must be idle to join (the driver forms it between rollouts), so a member
# that never comes is a failure to report soon.
JOIN_TIMEOUT_S = 120.0
# One broadcast: rank 0 waits for every engine to reach it, i.e. for the rollouts queued on the engines
# before the update (trainer.max_staleness > 0) to finish.
OP_TIMEOUT_S = 1800.0
_PREFIX = "mopd/weight_sync"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch's name without the module: "float32"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


def plan_buckets(nbytes: list[int], bucket_bytes: int) -> list[tuple[list[int], list[int], int]]:
    """Tensors of these sizes, in order, packed into buckets of at most `bucket_bytes` (a larger tensor alone):
    per bucket the tensors' indices, their byte offsets in it (multiples of ALIGN) and its size."""
    out: list[tuple[list[int], list[int], int]] = []
    idx: list[int] = []
    offs: list[int] = []
    size = 0
    for i, n in enumerate(nbytes):
        start = -(-size // ALIGN) * ALIGN
        if idx and start + n > bucket_bytes:
            out.append((idx, offs, size))
            idx, offs, size, start = [], [], 0, 0
        idx.append(i)
        offs.append(start)
        size = start + n
    if idx:
        out.append((idx, offs, size))
    return out


def node_ip() -> str:
    """This node's IP as Ray knows it (loopback on a private cluster)."""
    return ray.util.get_node_ip_address()


def open_store(host: str, world: int, timeout_s: float = JOIN_TIMEOUT_S) -> dist.TCPStore:
    """Rank 0: the group's rendezvous store on `host` and a free port the OS picks (`store.port`)."""
    return dist.TCPStore(host, 0, world, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class WeightGroup:
    """One member of the group. Rank 0 builds it on `open_store`'s store; the engines `connect`. Constructing it
    blocks until every member has joined (then a one-element broadcast checks the group end to end)."""

    def __init__(self, store: dist.Store, rank: int, world: int, backend: str, local_host: str,
                 join_timeout_s: float = JOIN_TIMEOUT_S, op_timeout_s: float = OP_TIMEOUT_S) -> None:
        """`local_host`: this member's own node IP, where its group connections listen."""
        self.rank, self.world, self.backend = rank, world, backend
        self.store = store  # kept alive with the group
        prefix = dist.PrefixStore(_PREFIX, store)
        if backend == "gloo":
            gloo = dist.ProcessGroupGloo
            opts = gloo._Options()
            # Listen on the node's IP (as Ray knows it), not on whatever the hostname resolves to.
            opts._devices = [gloo.create_device(hostname=local_host)]
            opts._timeout = timedelta(seconds=join_timeout_s)
            self.pg = gloo(prefix, rank, world, opts)
            self.pg.set_timeout(timedelta(seconds=op_timeout_s))
            self.device = torch.device("cpu")
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timedelta(seconds=op_timeout_s)
            self.pg = dist.ProcessGroupNCCL(prefix, rank, world, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"weight sync backend {backend!r}: expected gloo or nccl")
        check = torch.ones(1, device=self.device)
        self.broadcast(check)

    @classmethod
    def connect(cls, host: str, port: int, rank: int, world: int, backend: str, local_host: str | None = None,
                join_timeout_s: float = JOIN_TIMEOUT_S, op_timeout_s: float = OP_TIMEOUT_S) -> WeightGroup:
        """An engine's side: join rank 0's store at (host, port) as `rank` of `world`; `local_host`: this
        node's IP (None: Ray's)."""
        store = dist.TCPStore(host, port, world, False, timeout=timedelta(seconds=join_timeout_s))
        return cls(store, rank, world, backend, local_host or node_ip(), join_timeout_s, op_timeout_s)

    def broadcast(self, t: torch.Tensor) -> None:
        """From rank 0 into `t` on every other member (in place on rank 0)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()

    # -- rank 0 ------------------------------------------------------------------------------------------
    def send(self, tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> int:
        """Rank 0: broadcast named tensors (the header, then bucket by bucket); returns the bytes sent."""
        items = [(k, v.detach()) for k, v in tensors]
        metas = [TensorMeta(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in items]
        header = json.dumps({"bucket_bytes": bucket_bytes,
                             "tensors": [[m.name, m.dtype, list(m.shape)] for m in metas]}).encode()
        self.broadcast(torch.tensor([len(header)], dtype=torch.int64, device=self.device))
        self.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device))
        sent = 0
        plan = plan_buckets([m.nbytes for m in metas], bucket_bytes)

        def alone(idx: list[int]) -> bool:  # a tensor alone that goes as it is: no copy
            t = items[idx[0]][1]
            return len(idx) == 1 and t.device == self.device and t.is_contiguous()

        packed = max((size for idx, _, size in plan if not alone(idx)), default=0)
        staging = torch.empty(packed, dtype=torch.uint8, device=self.device)
        for idx, offs, size in plan:
            if size == 0:
                continue
            if alone(idx):
                buf = items[idx[0]][1].reshape(-1).view(torch.uint8)
            else:
                buf = staging[:size]  # reused: a broadcast has completed on this side when it returns
                for i, off in zip(idx, offs, strict=True):
                    b = items[i][1].contiguous().reshape(-1).view(torch.uint8)
                    buf[off:off + b.numel()].copy_(b)
            self.broadcast(buf)
            sent += size
        return sent

    # -- engines -----------------------------------------------------------------------------------------
    def receive(self) -> tuple[list[str], Iterator[tuple[str, torch.Tensor]]]:
        """An engine: the names rank 0 is sending and an iterator over the tensors, each a view into the bucket
        it came in (receiving a bucket when the first of its tensors is asked for). Drain the iterator (`drain`)
        even if the consumer stops early: rank 0 sends every bucket."""
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(n)
        raw = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(raw)
        header = json.loads(bytes(raw.cpu().numpy()).decode())
        metas = [TensorMeta(k, d, tuple(s)) for k, d, s in header["tensors"]]
        return [m.name for m in metas], self._tensors(metas, header["bucket_bytes"])

    def _tensors(self, metas: list[TensorMeta], bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
        for idx, offs, size in plan_buckets([m.nbytes for m in metas], bucket_bytes):
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            if size:
                self.broadcast(buf)
            for i, off in zip(idx, offs, strict=True):
                m = metas[i]
                yield m.name, buf[off:off + m.nbytes].view(m.torch_dtype).view(m.shape)


def drain(tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Receive whatever buckets a consumer left (so rank 0's broadcast completes)."""
    for _ in tensors:
        pass

