"""MXFP4 experts of a MoE layer (quantization/mxfp4.py's format): kept as loaded on the GPU, dequantized once loaded
on the CPU."""

from __future__ import annotations

import functools

import torch
from torch import nn

from tokenmill.layers.fused_moe import UnquantizedMoEMethod
from tokenmill.layers.quantization.mxfp4 import dequantize_mxfp4


class Mxfp4MoEMethod(UnquantizedMoEMethod):
    """MXFP4 experts: codes and exponents as loaded on the GPU; dequantized once loaded on the CPU, where they then
    run as unquantized experts."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        size = intermediate_size_per_partition
        for what, n in (("hidden size", hidden_size),
                        ("intermediate size per rank (after tensor_parallel_size)", size)):
            if n % 32:
                raise ValueError(f"{layer.prefix}: MXFP4 experts need a {what} divisible by 32, not {n}")
        self.params_dtype = params_dtype

        codes_loader = functools.partial(layer.weight_loader, col_unit=2)  # two codes a byte
        exponents_loader = functools.partial(layer.weight_loader, col_unit=32)  # one a block of 32
        for name, rows, cols in (("w13", 2 * size, hidden_size), ("w2", hidden_size, size)):
            setattr(layer, f"{name}_weight",
                    layer.make_param(torch.empty(num_experts, rows, cols // 2, dtype=torch.uint8), codes_loader))
            exponents = layer.make_param(torch.empty(num_experts, rows, cols // 32, dtype=torch.uint8),
                                         exponents_loader)
            exponents.dummy_range = (117, 121)  # random weights (load_format "dummy") of about 2^-8
            setattr(layer, f"{name}_weight_scale", exponents)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.w13_weight.device.type != "cpu":
            return
        for name in ("w13", "w2"):
            codes, exponents = getattr(layer, f"{name}_weight").data, getattr(layer, f"{name}_weight_scale").data
            values = dequantize_mxfp4(codes.unflatten(-1, (-1, 16)), exponents, self.params_dtype)
            setattr(layer, f"{name}_weight", nn.Parameter(values, requires_grad=False))
            setattr(layer, f"{name}_weight_scale", None)

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        if layer.w13_weight_scale is None:  # dequantized
            return super().apply(layer, x, topk_weights, topk_ids)
        from tokenmill.layers.fused_moe_triton import fused_experts

        return fused_experts(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, w13_bias=layer.w13_bias,
                             w2_bias=layer.w2_bias, activation=layer.activation,
                             some_held_elsewhere=layer.expert_parallel, w13_mxfp4_scales=layer.w13_weight_scale,
                             w2_mxfp4_scales=layer.w2_weight_scale)
