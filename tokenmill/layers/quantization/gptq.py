"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout), 4- or 8-bit weights with a scale and a zero point per group.

    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false,
                            "sym": true, "checkpoint_format": "gptq"}

Each quantized linear stores, for W as [in, out] (the transpose of nn.Linear's), with p = 32 / bits values a word:

    qweight  int32 [in / p, out]        input k in word k / p, bits (k % p) * bits up
    qzeros   int32 [groups, out / p]    output n in word n / p, the same way; the "gptq" format stores z - 1
    scales   fp16  [groups, out]
    g_idx    int32 [in]                 each input's group (k / group_size, or a permutation with desc_act)
    w[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]

At load the values are unpacked into [out, in] (so that tensor-parallel shards are cut as any weight's). 4-bit
weights stay 4-bit through the device's kernel (int4.py): the inputs are reordered so that each group's are
contiguous (desc_act's permutation applied to the activations) and the kernel's zero is (8 - z) * s, exact.
8-bit weights, and shapes no kernel takes, are dequantized at load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.quantization import int4
from tokenmill.layers.quantization.base import LinearMethod, QuantizationConfig, WeightLoader


def unpack_gptq(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> uint8 values, `dim` (0: rows, 1: columns) expanded by 32 / bits, lowest bits first."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C, per_word]
    if dim == 0:
        values = values.permute(0, 2, 1)  # [R, per_word, C]: row r's words hold rows r * per_word + i
    return values.reshape(packed.shape[0] * (per_word if dim == 0 else 1), -1).to(torch.uint8)


class GPTQLinearMethod(LinearMethod):
    def __init__(self, bits: int, group_size: int, zero_offset: int) -> None:
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset
        self.kernel: int4.Kernel | None = None  # 4-bit: with layer.int4_weight (and layer.input_order)

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        self.params_dtype, self.g_idx_loaded = params_dtype, False
        num_groups = -(-layer.input_size // self.group_size)  # every group: desc_act may use any in any shard
        out, bits = output_size_per_partition, self.bits

        def rows_only(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            offset, size, start = layer.output_shard(shard_id)
            param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))

        def param(shape: tuple[int, ...], dtype: torch.dtype, load: WeightLoader) -> nn.Parameter:
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            p.weight_loader = load
            return p

        def input_slice(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            """Matrices packed in one layer share their input, so GPTQ gave them one order (one g_idx)."""
            start, size = layer.input_shard()
            part = loaded.narrow(0, start, size).long()
            if self.g_idx_loaded and not torch.equal(param.data, part.to(param.device)):
                raise ValueError(f"{layer.prefix}: the packed matrices' g_idx differ (shard {shard_id!r}); "
                                 "tokenmill needs one input order for matrices that share an input")
            param.data.copy_(part)
            self.g_idx_loaded = True

        layer.qweight = param((out, input_size_per_partition), torch.uint8,
                              lambda p, t, s=None: layer.load_sharded(p, unpack_gptq(t, bits, 0).t(), s))
        layer.qzeros = param((out, num_groups), torch.uint8,
                             lambda p, t, s=None: rows_only(p, unpack_gptq(t, bits, 1).t(), s))
        layer.scales = param((out, num_groups), torch.float32, lambda p, t, s=None: rows_only(p, t.float().t(), s))
        layer.g_idx = param((input_size_per_partition,), torch.int64, input_slice)
        layer.g_idx.optional = True  # old checkpoints have none: groups in input order
        start, size = layer.input_shard()
        layer.g_idx.data.copy_((torch.arange(size) + start) // self.group_size)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, g_idx = layer.qweight.data, layer.g_idx.data.long()
        zeros = layer.qzeros.data.float() + self.zero_offset
        scales = layer.scales.data
        del layer.qweight, layer.qzeros, layer.scales, layer.g_idx
        if self.bits == 4 and self._pack(layer, q, g_idx, zeros, scales):
            return
        weight = (q.float() - zeros[:, g_idx]) * scales[:, g_idx]
        layer.weight = nn.Parameter(weight.to(self.params_dtype), requires_grad=False)

    def _pack(self, layer: nn.Module, q: torch.Tensor, g_idx: torch.Tensor, zeros: torch.Tensor,
              scales: torch.Tensor) -> bool:
        """The int4 kernel's layout, if each of its groups falls in one GPTQ group once inputs are ordered
        by group (not so for a tensor-parallel shard holding part of a desc_act group)."""
        order = torch.argsort(g_idx, stable=True)
        sizes = int4.GROUP_SIZES
        size = next((g for g in (self.group_size, *sizes) if g in sizes and q.shape[1] % g == 0), None)
        if size is None:
            return False
        groups = g_idx[order].view(-1, size)
        if not bool((groups == groups[:, :1]).all()):
            return False
        first = groups[:, 0]
        packed = int4.pack(q[:, order], scales[:, first], (8 - zeros[:, first]) * scales[:, first], size,
                           self.params_dtype)
        if packed is None:
            return False
        layer.int4_weight, self.kernel = packed
        identity = torch.arange(len(order), device=order.device)
        layer.input_order = None if bool((order == identity).all()) else order
        return True

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            if layer.input_order is not None:
                x = x.index_select(-1, layer.input_order)
            return self.kernel(x, layer.int4_weight, bias)
        return F.linear(x, layer.weight, bias)


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, zero_offset: int) -> None:
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        bits, group_size = config.get("bits"), config.get("group_size", 128)
        checkpoint_format = config.get("checkpoint_format", "gptq")
        if bits not in (4, 8) or not isinstance(group_size, int) or checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ with bits={bits}, group_size={group_size}, checkpoint_format="
                             f"{checkpoint_format!r} is not supported; supported: 4 or 8 bits, formats gptq and "
                             "gptq_v2")
        # group_size -1: one group over every input
        return cls(bits, group_size if group_size > 0 else 1 << 30, 1 if checkpoint_format == "gptq" else 0)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        return GPTQLinearMethod(self.bits, self.group_size, self.zero_offset)
