"""Process-group setup for single-process and ``torchrun`` (DDP) training.

Launched by ``torchrun`` the environment holds RANK, WORLD_SIZE and LOCAL_RANK; otherwise the
job is one process of rank 0 in a world of 1 and no process group is created. Backend: nccl on
CUDA, gloo on CPU. With CUDA every rank uses ``cuda:LOCAL_RANK``.

Data sharding is not here: ``loop.batch_indices`` derives every rank's slice of each global
batch from the seed, so no DistributedSampler state exists to checkpoint.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and figures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context_from_env(device: str = "auto") -> DistContext:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (defaults 0/1/0) and pick this rank's device.

    ``device``: auto | cpu | cuda | cuda:N. Under torchrun with CUDA the index is LOCAL_RANK and
    an explicit other index is an error (two ranks on one GPU is never what was meant).
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if world > 1:
            if dev.index is not None and dev.index != local:
                raise ValueError(f"device {device!r} conflicts with LOCAL_RANK={local} under "
                                 "torchrun; pass --device cuda")
            dev = torch.device("cuda", local)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist ({torch.cuda.device_count()} GPUs)")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def init_process_group(ctx: DistContext) -> None:
    """Join the process group when launched by torchrun (no-op for a single process)."""
    if not ctx.distributed or dist.is_initialized():
        return
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    kwargs = {"device_id": ctx.device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over ranks (in place, returned); identity for one process."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= ctx.world_size
    return t


def broadcast_module(module: torch.nn.Module, ctx: DistContext) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a model)."""
    if ctx.distributed:
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)


def all_reduce_gradients(params: list[torch.Tensor], ctx: DistContext,
                         bucket_bytes: int = 64 * 2**20) -> None:
    """Average the gradients of ``params`` over ranks, in place: flattened buckets of one dtype
    (at most ``bucket_bytes`` each), one ``all_reduce`` per bucket. A parameter without a
    gradient on this rank gets zeros if another rank has one (every rank then sends the same
    layout) and stays without one if no rank has one (the optimizer then skips it, as in a
    single process). The same mean as DDP's, with the communication after the backward
    instead of overlapped with it."""
    if not ctx.distributed:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                       device=params[0].device if params else ctx.device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    grads = []
    for p, anywhere in zip(params, has.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    buckets: list[list[torch.Tensor]] = []
    size, dtype = 0, None
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not buckets or g.dtype != dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size, dtype = 0, g.dtype
        buckets[-1].append(g)
        size += nbytes
    for bucket in buckets:
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= ctx.world_size
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


def all_gather_objects(obj: object, ctx: DistContext) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` for one process)."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
