"""Linear layers that know their tensor-parallel shard. Each parameter's `weight_loader` takes the
full checkpoint tensor and copies in this rank's slice, so loading is one lookup per checkpoint name.

    ReplicatedLinear       the whole matrix on every rank: y = x @ W.T
    ColumnParallelLinear   splits the output dim:  y_shard = x @ W[rows of this rank].T
    RowParallelLinear      splits the input dim:   y = all_reduce(x_shard @ W[:, cols of this rank].T)
    MergedColumnParallelLinear / QKVParallelLinear  several column-parallel matrices in one

What the weights are and how they multiply is the layer's `linear_method` (layers/quantization/base.py),
chosen by the checkpoint's quantization config; without one, UnquantizedLinearMethod below. A layer built
with `dense_weight=True` is one whose weight its model reads as a matrix, not only through forward (MLA's
kv_b_proj, whose rows are viewed as W_UK / W_UV): its method is the format's `dequantizing()` one, which
leaves `weight` a plain [output, input] matrix of the model's dtype on every device once loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from tokenmill.layers.cublaslt import Plan
from tokenmill.layers.quantization import LinearMethod, QuantizationConfig
from tokenmill.layers.quantization.base import WeightLoader


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gemm_plans: dict[int, Plan] | None = None) -> torch.Tensor:
    """F.linear, except on the GPU:
    - a single half-precision row (batch-1 decode) only streams the weight: there a GEMV kernel reads it
      at more of the memory bandwidth than cuBLAS's choice (1.6-3.1 TB/s against 1.4-2.8 TB/s on an H100,
      per Llama-3.1-8B matrix);
    - a product whose row count has a plan in `gemm_plans` (tuned at start-up, cublaslt.tune) runs the
      cuBLASLt algorithm that won."""
    if x.is_cuda and x.dim() == 2:
        if x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.stride(1) == 1 \
                and weight.stride(1) == 1:
            from tokenmill.layers.triton_ops import gemv

            return gemv(x, weight, bias)
        if bias is None and gemm_plans:
            plan = gemm_plans.get(x.shape[0])
            if plan is not None and plan.suits(x, weight):
                return plan(x, weight)
    return F.linear(x, weight, bias)


class UnquantizedLinearMethod(LinearMethod):
    """Weights in the model's dtype, [output, input] as HF stores them. `gemm_plans`: the cuBLASLt plans
    of this weight's shape by row count, shared by every layer of that shape (set by the worker's
    start-up tuning; empty on CPU or with tuning off)."""

    def __init__(self) -> None:
        self.gemm_plans: dict[int, Plan] = {}

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        layer.weight = make_param(torch.empty(output_size_per_partition, input_size_per_partition,
                                              dtype=params_dtype), weight_loader)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing: the checkpoint's layout is the one F.linear and the GEMV read."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, layer.weight, bias, self.gemm_plans)

    def dequantizing(self, prefix: str) -> LinearMethod:
        return self


def make_param(data: torch.Tensor, weight_loader: WeightLoader) -> nn.Parameter:
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = weight_loader
    return param


class LinearBase(nn.Module):
    """Shape, prefix and linear method of a linear layer; subclasses split it across ranks.

    Loading is by shard geometry: `output_shard(shard_id)` places a checkpoint tensor's rows (a packed
    layer's q/k/v or gate/up, this rank's slice of them) and `input_shard()` its columns, for the weight and
    for any tensor a linear method adds (scales per channel or per block: `load_sharded` with block units).
    """

    splits_bias = True  # column-parallel layers hold their rows' bias; row-parallel ones the whole bias

    def __init__(self, input_size_per_partition: int, output_size_per_partition: int, bias: bool,
                 quant_config: QuantizationConfig | None, prefix: str, dense_weight: bool = False) -> None:
        super().__init__()
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.prefix = prefix
        self.linear_method = (quant_config.get_linear_method(self, prefix) if quant_config is not None
                              else UnquantizedLinearMethod())
        if dense_weight:
            self.linear_method = self.linear_method.dequantizing(prefix)
        self.linear_method.create_weights(self, input_size_per_partition, output_size_per_partition,
                                          torch.get_default_dtype(), self.weight_loader)
        self.bias = make_param(torch.empty(output_size_per_partition if self.splits_bias else self.output_size),
                               self.bias_loader) if bias else None

    num_output_shards = 1  # the checkpoint tensors packed into this layer's rows

    def output_shard(self, shard_id: int | str | None) -> tuple[int, int, int]:
        """(first row in this rank's parameter, rows, first row in the checkpoint tensor) of a shard; by
        default every row (a layer that does not split its output)."""
        return 0, self.output_size, 0

    def shard_index(self, shard_id: int | str | None) -> int:
        """The shard's position among num_output_shards (for per-shard scalars, such as per-tensor scales)."""
        return 0

    def input_shard(self) -> tuple[int, int]:
        """(first column in the checkpoint tensor, columns) of this rank's partition of the input."""
        return 0, self.input_size

    def load_sharded(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None,
                     row_unit: int = 1, col_unit: int = 1) -> None:
        """Copies this rank's part of a checkpoint tensor laid out like the weight, in units of row_unit x
        col_unit (1 for the weight, a block's size for block scales); a dimension of 1 (a per-channel scale's
        [N, 1]) is copied whole."""
        offset, size, start = self.output_shard(shard_id)
        if offset % row_unit or start % row_unit:
            raise ValueError(f"{self.prefix}: shard {shard_id!r} does not start on a block of {row_unit} rows")
        rows = -(-size // row_unit)
        target = param.data.narrow(0, offset // row_unit, rows)
        source = loaded.narrow(0, start // row_unit, rows)
        if source.dim() == 2 and source.shape[1] > 1:  # not a per-channel scale ([N, 1])
            in_start, in_size = self.input_shard()
            source = source.narrow(1, in_start // col_unit, -(-in_size // col_unit))
        if [d for d in target.shape if d != 1] != [d for d in source.shape if d != 1]:  # [N] takes [N, 1]
            raise ValueError(f"shape mismatch loading {self.prefix} (shard {shard_id!r}): parameter "
                             f"{tuple(target.shape)}, checkpoint {tuple(source.shape)} of {tuple(loaded.shape)}")
        target.copy_(source.reshape(target.shape))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        self.load_sharded(param, loaded, shard_id)

    def bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        self.load_sharded(param, loaded, shard_id)


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank, no communication (DeepSeek's q_a and kv_a projections: their small
    outputs feed every head)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        self.input_size, self.output_size = input_size, output_size
        super().__init__(input_size, output_size, bias, quant_config, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "", dense_weight: bool = False
                 ) -> None:
        tp_size = get_tp_size()
        if output_size % tp_size:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size {tp_size}")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = output_size // tp_size
        self.gather_output = gather_output
        super().__init__(input_size, self.output_size_per_partition, bias, quant_config, prefix, dense_weight)

    def output_shard(self, shard_id: int | str | None) -> tuple[int, int, int]:
        size = self.output_size_per_partition
        return 0, size, self.tp_rank * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_method.apply(self, x, self.bias)
        return tp_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked on the output dim (e.g. gate_proj and up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        self.output_sizes = output_sizes
        self.num_output_shards = len(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, quant_config=quant_config, prefix=prefix)

    def output_shard(self, shard_id: int | str | None) -> tuple[int, int, int]:
        size = self.output_sizes[shard_id] // self.tp_size
        return sum(self.output_sizes[:shard_id]) // self.tp_size, size, self.tp_rank * size

    def shard_index(self, shard_id: int | str | None) -> int:
        return shard_id


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix; each rank holds its heads (kv heads replicated if fewer)."""

    num_output_shards = 3

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        self.num_kv_head_replicas = max(1, tp_size // total_num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_dim
        super().__init__(hidden_size, output_size, bias, quant_config=quant_config, prefix=prefix)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def output_shard(self, shard_id: int | str | None) -> tuple[int, int, int]:
        if shard_id == "q":
            return 0, self.q_size, self.tp_rank * self.q_size
        offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
        return offset, self.kv_size, self.tp_rank // self.num_kv_head_replicas * self.kv_size

    def shard_index(self, shard_id: int | str | None) -> int:
        return "qkv".index(shard_id)


class RowParallelLinear(LinearBase):
    splits_bias = False

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        tp_size = get_tp_size()
        if input_size % tp_size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {tp_size}")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size // tp_size
        super().__init__(self.input_size_per_partition, output_size, bias, quant_config, prefix)

    def input_shard(self) -> tuple[int, int]:
        return self.tp_rank * self.input_size_per_partition, self.input_size_per_partition

    def bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        if param.shape != loaded.shape:
            raise ValueError(f"shape mismatch loading {self.prefix}.bias: parameter {tuple(param.shape)}, "
                             f"checkpoint {tuple(loaded.shape)}")
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, after the ranks' partial products are summed.
        y = tp_all_reduce(self.linear_method.apply(self, x))
        return y + self.bias if self.bias is not None else y
