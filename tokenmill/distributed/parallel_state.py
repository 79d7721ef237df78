"""The process groups of one engine, the tensor-parallel collectives the layers call, and the pipeline's
transfers between stages.

Every rank of an engine runs one Worker; `init_distributed` joins them in a torch.distributed world (NCCL on
GPUs, gloo on CPUs) before the model is built. Ranks are laid out stage by stage: rank = pp_rank * tp + tp_rank,
so a stage's tensor-parallel group is consecutive ranks and a rank's pipeline group is the ranks of its tp_rank
in every stage. With a world of 1 nothing is initialized: rank 0 of 1, and the collectives return their input.
Layers and the model runner ask these functions, never torch.distributed directly.

Expert parallelism (`enable_expert_parallel`) spreads the MoE layers' experts over each stage's tensor-parallel
group: its expert-parallel group is that group, so an expert-parallel rank is its tp_rank (layers/fused_moe.py).
Data-parallel cores are separate engines with worlds of their own (engine/dp_client.py), so the expert-parallel
group never spans them: each core holds every expert, spread over its own tensor-parallel ranks.
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


def init_distributed(rank: int, world_size: int, tensor_parallel_size: int, init_method: str, backend: str,
                     timeout_s: float, enable_expert_parallel: bool = False) -> None:
    """Joins this process to the engine's world as `rank` and builds its tensor-parallel group (consecutive
    ranks) and pipeline group (every tensor_parallel_size-th rank); with `enable_expert_parallel` the
    tensor-parallel group is also the expert-parallel one. Creating the world, and any collective later, fails
    after `timeout_s` instead of hanging."""
    global _TP_GROUP, _TP_RANK, _TP_SIZE, _PP_GROUP, _PP_RANKS, _PP_RANK, _PP_SIZE, _EP_RANK, _EP_SIZE
    tp = tensor_parallel_size
    if world_size % tp:
        raise ValueError(f"world size {world_size} is not a multiple of tensor_parallel_size {tp}")
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    for first in range(0, world_size, tp):  # every rank creates every group, in one order
        ranks = list(range(first, first + tp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _TP_GROUP, _TP_RANK, _TP_SIZE = group, rank - first, tp
    for tp_rank in range(tp):
        ranks = list(range(tp_rank, world_size, tp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _PP_GROUP, _PP_RANKS, _PP_RANK, _PP_SIZE = group, ranks, ranks.index(rank), len(ranks)
    if enable_expert_parallel:
        _EP_RANK, _EP_SIZE = _TP_RANK, _TP_SIZE


def destroy_distributed() -> None:
    global _TP_GROUP, _TP_RANK, _TP_SIZE, _PP_GROUP, _PP_RANKS, _PP_RANK, _PP_SIZE, _EP_RANK, _EP_SIZE
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP, _TP_RANK, _TP_SIZE = None, 0, 1
    _PP_GROUP, _PP_RANKS, _PP_RANK, _PP_SIZE = None, [0], 0, 1
    _EP_RANK, _EP_SIZE = 0, 1


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def get_ep_rank() -> int:
    return _EP_RANK


def get_ep_size() -> int:
    """The ranks a MoE layer's experts are spread over: tensor_parallel_size with expert parallelism, else 1."""
    return _EP_SIZE


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
