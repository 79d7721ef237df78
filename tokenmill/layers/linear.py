"""Linear layers that know their tensor-parallel shard. Each parameter's `weight_loader` takes the
full checkpoint tensor and copies in this rank's slice, so loading is one lookup per checkpoint name.

    ColumnParallelLinear   splits the output dim:  y_shard = x @ W[rows of this rank].T
    RowParallelLinear      splits the input dim:   y = all_reduce(x_shard @ W[:, cols of this rank].T)
    MergedColumnParallelLinear / QKVParallelLinear  several column-parallel matrices in one
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from tokenmill.layers import cublaslt


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except on the GPU:
    - a single half-precision row (batch-1 decode) only streams the weight: there a GEMV kernel reads it
      at more of the memory bandwidth than cuBLAS's choice (benchmarks/gemv_bench.py,
      results/h100-2026-11-23-s3: 1.6-3.1 TB/s against 1.4-2.8 TB/s on an H100, per Llama-3.1-8B matrix);
    - a product whose shape was tuned before the CUDA graphs were captured runs the cuBLASLt algorithm
      that won (cublaslt.tune)."""
    if x.is_cuda and x.dim() == 2:
        if x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.stride(1) == 1 \
                and weight.stride(1) == 1:
            from tokenmill.layers.triton_ops import gemv

            return gemv(x, weight, bias)
        if bias is None:
            plan = cublaslt.plan_for(x, weight)
            if plan is not None:
                return plan(x, weight)
    return F.linear(x, weight, bias)


def _param(data: torch.Tensor, weight_loader) -> nn.Parameter:
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = weight_loader
    return param


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch loading {what}: parameter {tuple(param.shape)}, "
                         f"checkpoint {tuple(loaded.shape)}")
    param.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False) -> None:
        super().__init__()
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        if output_size % self.tp_size:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size {self.tp_size}")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = output_size // self.tp_size
        self.gather_output = gather_output
        self.weight = _param(torch.empty(self.output_size_per_partition, input_size), self.weight_loader)
        self.bias = _param(torch.empty(self.output_size_per_partition), self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shard = param.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * shard, shard), "column-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        return tp_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked on the output dim (e.g. gate_proj and up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        target = param.data.narrow(0, offset, shard_size)
        _copy_checked(target, loaded.narrow(0, self.tp_rank * shard_size, shard_size), f"shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix; each rank holds its heads (kv heads replicated if fewer)."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False) -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        self.num_kv_head_replicas = max(1, tp_size // total_num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_dim
        super().__init__(hidden_size, output_size, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, rank = self.kv_size, self.tp_rank // self.num_kv_head_replicas
        target = param.data.narrow(0, offset, size)
        _copy_checked(target, loaded.narrow(0, rank * size, size), f"{shard_id}_proj")


class RowParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        if input_size % self.tp_size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {self.tp_size}")
        self.input_size_per_partition = input_size // self.tp_size
        self.weight = _param(torch.empty(output_size, self.input_size_per_partition), self.weight_loader)
        self.bias = _param(torch.empty(output_size), self._bias_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shard = param.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.tp_rank * shard, shard), "row-parallel weight")

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _copy_checked(param.data, loaded, "row-parallel bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(linear(x, self.weight))
        return y + self.bias if self.bias is not None else y
