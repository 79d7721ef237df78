"""The process groups of one engine, the tensor-parallel collectives the layers call, and the pipeline's
transfers between stages.

Every rank of an engine runs one Worker; `init_distributed` joins them in a torch.distributed world (NCCL on
GPUs, gloo on CPUs) before the model is built. Ranks are laid out stage by stage: rank = pp_rank * tp + tp_rank,
so a stage's tensor-parallel group is consecutive ranks and a rank's pipeline group is the ranks of its tp_rank
in every stage. With a world of 1 nothing is initialized: rank 0 of 1, and the collectives return their input.
Layers and the model runner ask these functions, never torch.distributed directly.

Expert parallelism (`enable_expert_parallel`) spreads the MoE layers' experts over each stage's tensor-parallel
group: its expert-parallel group is that group, so an expert-parallel rank is its tp_rank (layers/fused_moe.py).

Data-parallel cores are separate engines (engine/dp_client.py), each with a world of its own, except when
expert parallelism spans them: then the ranks of all data_parallel_size cores (one stage each) form one world,
core d's ranks d * world_size ... (d + 1) * world_size - 1, its tensor-parallel group among them; the
expert-parallel group is the whole world (expert-parallel rank = global rank), whose ranks hold different
tokens and exchange them all-to-all (ep_all_to_all); and the cores' first ranks, each in its core's process,
form a gloo group on which the cores agree, step by step, whether any has work (dp_sync).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_TP_RANK, _TP_SIZE = 0, 1
_PP_GROUP: dist.ProcessGroup | None = None
_PP_RANKS: list[int] = [0]  # global ranks of this rank's pipeline group, stage by stage
_PP_RANK, _PP_SIZE = 0, 1
_EP_RANK, _EP_SIZE = 0, 1
_EP_GROUP: dist.ProcessGroup | None = None  # only when expert parallelism spans data-parallel cores
_DP_SYNC_GROUP: dist.ProcessGroup | None = None  # the cores' first ranks (gloo), on those ranks


def init_distributed(rank: int, world_size: int, tensor_parallel_size: int, init_method: str, backend: str,
                     timeout_s: float, enable_expert_parallel: bool = False, data_parallel_rank: int = 0,
                     data_parallel_size: int = 1) -> None:
    """Joins this process to the engine's world as `rank` and builds its tensor-parallel group (consecutive
    ranks) and pipeline group (every tensor_parallel_size-th rank); with `enable_expert_parallel` the
    tensor-parallel group is also the expert-parallel one. With data_parallel_size > 1 (expert parallelism
    over the cores), `rank` of `world_size` is within core `data_parallel_rank`, the world holds every core's
    ranks and the expert-parallel group is all of them. Creating the world, and any collective later, fails
    after `timeout_s` instead of hanging."""
    global _TP_GROUP, _TP_RANK, _TP_SIZE, _PP_GROUP, _PP_RANKS, _PP_RANK, _PP_SIZE, _EP_RANK, _EP_SIZE
    global _EP_GROUP, _DP_SYNC_GROUP
    tp = tensor_parallel_size
    if world_size % tp:
        raise ValueError(f"world size {world_size} is not a multiple of tensor_parallel_size {tp}")
    timeout = timedelta(seconds=timeout_s)
    offset, total = data_parallel_rank * world_size, data_parallel_size * world_size
    dist.init_process_group(backend, init_method=init_method, rank=offset + rank, world_size=total,
                            timeout=timeout)
    for core in range(0, total, world_size):  # every rank creates every group, in one order
        for first in range(core, core + world_size, tp):
            ranks = list(range(first, first + tp))
            group = dist.new_group(ranks, timeout=timeout)
            if offset + rank in ranks:
                _TP_GROUP, _TP_RANK, _TP_SIZE = group, offset + rank - first, tp
        for tp_rank in range(tp):
            ranks = list(range(core + tp_rank, core + world_size, tp))
            group = dist.new_group(ranks, timeout=timeout)
            if offset + rank in ranks:
                _PP_GROUP, _PP_RANKS, _PP_RANK, _PP_SIZE = group, ranks, ranks.index(offset + rank), len(ranks)
    if data_parallel_size > 1:
        drivers = list(range(0, total, world_size))
        group = dist.new_group(drivers, timeout=timeout, backend="gloo")
        _DP_SYNC_GROUP = group if rank == 0 else None
        _EP_GROUP, _EP_RANK, _EP_SIZE = dist.group.WORLD, offset + rank, total
    elif enable_expert_parallel:
        _EP_RANK, _EP_SIZE = _TP_RANK, _TP_SIZE


def destroy_distributed() -> None:
    global _TP_GROUP, _TP_RANK, _TP_SIZE, _PP_GROUP, _PP_RANKS, _PP_RANK, _PP_SIZE, _EP_RANK, _EP_SIZE
    global _EP_GROUP, _DP_SYNC_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP, _TP_RANK, _TP_SIZE = None, 0, 1
    _PP_GROUP, _PP_RANKS, _PP_RANK, _PP_SIZE = None, [0], 0, 1
    _EP_RANK, _EP_SIZE = 0, 1
    _EP_GROUP, _DP_SYNC_GROUP = None, None


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def get_ep_rank() -> int:
    return _EP_RANK


def get_ep_size() -> int:
    """The ranks a MoE layer's experts are spread over: tensor_parallel_size with expert parallelism, else 1."""
    return _EP_SIZE


def ep_exchanges_tokens() -> bool:
    """The expert-parallel ranks hold different tokens (they span data-parallel cores): a MoE layer sends each
    token to its experts' ranks and back (ep_all_to_all) instead of computing its share of the same tokens."""
    return _EP_GROUP is not None


def ep_all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int] | None = None
                  ) -> tuple[torch.Tensor, list[int]]:
    """Rows of x [sum(send_counts), ...] in expert-parallel rank order, send_counts[r] of them to rank r; returns
    the rows received, rank by rank, and how many came from each rank (exchanged first unless given)."""
    if recv_counts is None:
        counts = torch.tensor(send_counts, dtype=torch.int64, device=x.device)
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=_EP_GROUP)
        recv_counts = received.tolist()
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=_EP_GROUP)
    return out, recv_counts


def dp_sync(flags: list[int]) -> list[int]:
    """Each flag's maximum over the data-parallel cores (their first ranks, in the cores' processes): whether any
    core has work, whether any is stopping. Every core calls it once per turn of its loop, so the cores take
    each step together."""
    values = torch.tensor(flags, dtype=torch.int64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_DP_SYNC_GROUP)
    return values.tolist()


def get_pp_rank() -> int:
    return _PP_RANK


def get_pp_size() -> int:
    return _PP_SIZE


def is_first_stage() -> bool:
    return _PP_RANK == 0


def is_last_stage() -> bool:
    return _PP_RANK == _PP_SIZE - 1


def pp_send(tensors: list[torch.Tensor]) -> None:
    """Sends a stage's output (the hidden states and the residual) to the next stage's rank of this tp_rank."""
    for tensor in tensors:
        dist.send(tensor.contiguous(), _PP_RANKS[_PP_RANK + 1], group=_PP_GROUP)


def pp_recv(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Receives what the previous stage's pp_send sent, tensors of the given shapes."""
    tensors = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
    for tensor in tensors:
        dist.recv(tensor, _PP_RANKS[_PP_RANK - 1], group=_PP_GROUP)
    return tensors


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
