"""MXFP4 experts (GPT-OSS's published checkpoints, `quant_method: "mxfp4"`), dequantized to the model's dtype as
they load; every other layer of those checkpoints is stored unquantized.

An MXFP4 matrix W [N, K] (N output rows, K input columns; K a multiple of 32) is stored as two uint8 tensors,
per expert when stacked ([E, N, ...]):

    <name>_blocks  [N, K / 32, 16]   32 FP4 (e2m1) codes per block, two a byte: the low nibble is the
                                     block's even element, the high nibble the odd one
    <name>_scales  [N, K / 32]       one E8M0 exponent per block of 32: the block's values are
                                     code value x 2^(scale - 127)

An e2m1 code is a sign bit over 3 magnitude bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0-7), negated for 8-15.
For GPT-OSS, gate_up_proj_blocks is [E, 2I, H / 32, 16], its 2I rows interleaving gate and up (as the 16-bit
checkpoints' gate_up_proj [E, H, 2I] does its columns), and down_proj_blocks is [E, H, I / 32, 16].

On the GPU the experts stay MXFP4 (a quarter of bf16's memory, GPT-OSS-120B's experts fitting one GPU): FusedMoE's
w13_weight [E, 2I, H / 2] and w2_weight [E, H, I / 2] hold the codes with each row's blocks flattened, and
w13_weight_scale / w2_weight_scale [E, rows, K / 32] the exponents; fused_moe_triton's grouped GEMM widens each
tile to the activations' dtype as it loads it (exactly: a code value times a power of two). On the CPU they
are dequantized to the model's dtype once loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.quantization.base import LinearMethod, MoEMethod, QuantizationConfig

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G * 32] in `dtype` (exact: every value is a
    code value times a power of two)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != 16 \
            or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.dtype} {tuple(blocks.shape)} and scales {scales.dtype} "
                         f"{tuple(scales.shape)} do not pair (uint8 [..., G, 16] and [..., G])")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()  # [..., G, 32]
    values = torch.ldexp(table[codes], scales.to(torch.int32)[..., None] - SCALE_BIAS)
    return values.flatten(-2).to(dtype)


class Mxfp4Config(QuantizationConfig):
    """Only a model's experts are MXFP4 (its MoE layer dequantizes them); its linear layers are unquantized."""

    name = "mxfp4"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Mxfp4Config:
        return cls()

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        from tokenmill.layers.linear import UnquantizedLinearMethod  # layers/linear.py imports this package

        return UnquantizedLinearMethod()

    def get_moe_method(self, layer: nn.Module, prefix: str) -> MoEMethod:
        from tokenmill.layers.quantization.mxfp4_moe import Mxfp4MoEMethod  # (fused_moe imports this package)

        return Mxfp4MoEMethod()
