"""The process groups of one engine and the tensor-parallel collectives the layers call.

Every rank of an engine runs one Worker; `init_distributed` joins them in a torch.distributed world (NCCL on
GPUs, gloo on CPUs) before the model is built. With a world of 1 nothing is initialized: rank 0 of 1, and the
collectives return their input. Layers ask these functions, never torch.distributed directly.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_TP_RANK, _TP_SIZE = 0, 1


def init_distributed(rank: int, world_size: int, tensor_parallel_size: int, init_method: str, backend: str,
                     timeout_s: float) -> None:
    """Joins this process to the engine's world as `rank` and builds its tensor-parallel group (consecutive
    ranks). Creating the world, and any collective later, fails after `timeout_s` instead of hanging."""
    global _TP_GROUP, _TP_RANK, _TP_SIZE
    if world_size % tensor_parallel_size:
        raise ValueError(f"world size {world_size} is not a multiple of tensor_parallel_size {tensor_parallel_size}")
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    for first in range(0, world_size, tensor_parallel_size):  # every rank creates every group, in one order
        ranks = list(range(first, first + tensor_parallel_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _TP_GROUP, _TP_RANK, _TP_SIZE = group, rank - first, tensor_parallel_size


def destroy_distributed() -> None:
    global _TP_GROUP, _TP_RANK, _TP_SIZE
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP, _TP_RANK, _TP_SIZE = None, 0, 1


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the tensor-parallel ranks, in place."""
    if _TP_SIZE > 1:
        dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' x concatenated along `dim`, in rank order (every rank's x has the same shape)."""
    if _TP_SIZE == 1:
        return x
    gathered = torch.empty((_TP_SIZE, *x.shape), dtype=x.dtype, device=x.device)
    if x.is_cuda:
        dist.all_gather_into_tensor(gathered, x.contiguous(), group=_TP_GROUP)
    else:  # gloo has only the list form
        dist.all_gather(list(gathered.unbind(0)), x.contiguous(), group=_TP_GROUP)
    dim = dim % x.dim()
    return torch.cat(gathered.unbind(0), dim=dim)
