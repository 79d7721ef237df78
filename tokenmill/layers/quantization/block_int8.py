"""Weights kept as 8-bit integer codes with one scale and one zero per block of `group` inputs,
w = q * scale + zero: GGUF's Q8_0, Q5_0, Q5_1, Q5_K and Q6_K (gguf.py), and a layer that mixes them with its
4-bit types. One layout serves both devices:

    codes  int8 [K, N]                  W.T: a block is `group` consecutive rows
    scale  [K / group, N]               in the model's dtype
    zero   [K / group, N], or None      None where every zero is 0 (Q8_0, Q5_0, Q6_K)

On the CPU, PyTorch has no product with per-block scales (`_weight_int8pack_mm` scales whole output rows), so a
decode step's few rows multiply block by block: x's blocks [K / group, M, group] @ the codes [K / group, group, N]
in one bmm (the codes widened to x's dtype as it goes), each block's partial products scaled and summed over the
blocks, plus x's block sums @ zero. Measured on the 2-core CPU at a [1536, 576] weight and one row: 79 us, against
102 us for the float32 matrix, 190 us for `_weight_int8pack_mm` called per block and 81 us for the codes split
into two 4-bit halves through the int4 kernel (bfloat16 activations; 3x slower than the bmm at 32 rows); and
exact in the model's dtype. The partial products grow with M: from BMM_MAX_ROWS rows on, the weight is
dequantized in the call and multiplied by one GEMM. On a GPU, a Triton GEMM dequantizes the codes in registers
(block_int8_gpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.layers.quantization import int4

BMM_MAX_ROWS = 16  # above, dequantizing in the call and one GEMM is faster (equal at 16-32 rows)


@dataclass
class BlockInt8Weight:
    codes: torch.Tensor  # int8 [K, N]
    scale: torch.Tensor  # [K / group, N]
    zero: torch.Tensor | None  # [K / group, N]
    group: int


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype: torch.dtype
         ) -> tuple[BlockInt8Weight, int4.Kernel]:
    """codes int8 [N, K], scale and zero [N, K / group] (w = codes * scale + zero), on the layer's device."""
    n, k = codes.shape
    if k % group or scale.shape != (n, k // group) or zero.shape != scale.shape:
        raise ValueError(f"block int8 weights: codes {tuple(codes.shape)} in blocks of {group} need scale and zero "
                         f"{(n, k // group)}, got {tuple(scale.shape)} and {tuple(zero.shape)}")
    weight = BlockInt8Weight(codes.t().contiguous(), scale.t().to(dtype).contiguous(),
                             zero.t().to(dtype).contiguous() if bool(zero.any()) else None, group)
    if int4.backend_for(codes.device.type) == "cpu":
        return weight, block_int8_linear
    from tokenmill.layers.quantization.block_int8_gpu import block_int8_gemm  # Triton: where a GPU runs it

    return weight, block_int8_gemm


def dequantize(weight: BlockInt8Weight, dtype: torch.dtype) -> torch.Tensor:
    """W.T [K, N] in `dtype`."""
    k, n = weight.codes.shape
    w = weight.codes.view(k // weight.group, weight.group, n).to(dtype) * weight.scale[:, None].to(dtype)
    if weight.zero is not None:
        w += weight.zero[:, None].to(dtype)
    return w.view(k, n)


def block_int8_linear(x: torch.Tensor, weight: BlockInt8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias), in x's dtype (the CPU's path)."""
    k, n = weight.codes.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= BMM_MAX_ROWS:
        num_blocks = k // weight.group
        x_blocks = x2.reshape(-1, num_blocks, weight.group).transpose(0, 1)  # [blocks, M, group]
        partial = torch.bmm(x_blocks, weight.codes.view(num_blocks, weight.group, n).to(x.dtype))
        out = (partial * weight.scale[:, None].to(x.dtype)).sum(0)
        if weight.zero is not None:
            out += x_blocks.sum(-1).t() @ weight.zero.to(x.dtype)
    else:
        out = x2 @ dequantize(weight, x.dtype)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], n)
