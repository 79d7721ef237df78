"""AWQ checkpoints (AutoAWQ's GEMM layout), 4-bit weights with a scale and a zero point per group of inputs.

    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
                            "version": "gemm", "modules_to_not_convert": [...]}

Each quantized linear stores, for W as [in, out] (the transpose of nn.Linear's):

    qweight  int32 [in, out / 8]          8 nibbles per word, columns in the order 0 2 4 6 1 3 5 7
    qzeros   int32 [in / group, out / 8]   the same packing
    scales   fp16  [in / group, out]
    w[k, n] = (q[k, n] - z[k / group, n]) * s[k / group, n]

At load the nibbles are unpacked into [out, in] (so that tensor-parallel shards are cut as any weight's), then
repacked for the 4-bit kernel of the device (int4.py: scale s, zero (8 - z) * s, exact); a shape no kernel
takes is dequantized to the model's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.quantization import int4
from tokenmill.layers.quantization.base import LinearMethod, QuantizationConfig, WeightLoader

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column of each nibble (lowest first) within a word's 8 columns
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> uint8 [R, C] of the 4-bit values, columns in their natural order."""
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> _SHIFTS) & 0x0F  # [R, C / 8, 8], nibble i at [..., i]
    columns = torch.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles
    return columns.reshape(packed.shape[0], -1).to(torch.uint8)


class AWQLinearMethod(LinearMethod):
    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        self.kernel: int4.Kernel | None = None  # with layer.int4_weight; None: layer.weight, dequantized

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        self.params_dtype = params_dtype
        groups = -(-input_size_per_partition // self.group_size)
        g = self.group_size

        def loader(transform, col_unit: int) -> WeightLoader:
            return lambda param, loaded, shard_id=None: layer.load_sharded(param, transform(loaded), shard_id,
                                                                            col_unit=col_unit)

        def param(shape: tuple[int, int], dtype: torch.dtype, load: WeightLoader) -> nn.Parameter:
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            p.weight_loader = load
            return p

        out = output_size_per_partition
        layer.qweight = param((out, input_size_per_partition), torch.uint8, loader(lambda t: unpack_awq(t).t(), 1))
        layer.qzeros = param((out, groups), torch.uint8, loader(lambda t: unpack_awq(t).t(), g))
        layer.scales = param((out, groups), torch.float32, loader(lambda t: t.float().t(), g))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, zeros, scales = layer.qweight.data, layer.qzeros.data.float(), layer.scales.data
        del layer.qweight, layer.qzeros, layer.scales
        packed = int4.pack(q, scales, (8 - zeros) * scales, self.group_size, self.params_dtype)
        if packed is not None:
            layer.int4_weight, self.kernel = packed
            return
        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(self.group_size, dim=1)[:, :q.shape[1]]

        weight = (q.float() - expand(zeros)) * expand(scales)
        layer.weight = nn.Parameter(weight.to(self.params_dtype), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, layer.int4_weight, bias)
        return F.linear(x, layer.weight, bias)


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, group_size: int, not_converted: list[str]) -> None:
        self.group_size, self.not_converted = group_size, not_converted

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        bits = config.get("bits", config.get("w_bit"))
        group_size = config.get("group_size", config.get("q_group_size"))
        version, zero_point = str(config.get("version", "gemm")).lower(), config.get("zero_point", True)
        if bits != 4 or version != "gemm" or not zero_point or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"AWQ with bits={bits}, version={version!r}, zero_point={zero_point}, group_size="
                             f"{group_size} is not supported; supported: 4-bit GEMM layout with zero points")
        return cls(group_size, list(config.get("modules_to_not_convert") or []))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        from tokenmill.layers.linear import UnquantizedLinearMethod

        if any(name in prefix for name in self.not_converted):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self.group_size)
