"""4-bit weights on the CPU through PyTorch's packed kernel `_weight_int4pack_mm_for_cpu`, which computes
x @ W.T with W = (q - 8) * scale + zero per group of `group_size` weights along the input (q in 0..15, scale
and zero per (group, output row)). Every 4-bit format here (GGUF's Q4 types, AWQ, GPTQ) is that, exactly, once
its scale and zero point are rewritten into the kernel's (zero in the float domain)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATION_DTYPE = torch.bfloat16  # the kernel's fast path; float16 is 40-100x slower, float32 too
GROUP_SIZES = (32, 64, 128, 256)  # the kernel's


@dataclass
class Int4Weight:
    packed: torch.Tensor  # _convert_weight_to_int4pack_for_cpu's layout of q [N, K]
    scales_and_zeros: torch.Tensor  # [K / group_size, N, 2] in ACTIVATION_DTYPE
    group_size: int


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> Int4Weight:
    """q [N, K] (0..15), scale and zero [N, K / group_size] with w = (q - 8) * scale + zero."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"the CPU's 4-bit kernel takes groups of {GROUP_SIZES} weights, not {group_size}")
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(ACTIVATION_DTYPE).contiguous()
    return Int4Weight(torch._convert_weight_to_int4pack_for_cpu(q.int().contiguous(), 1), scales_and_zeros,
                      group_size)


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias), out in x's dtype.

    The kernel takes bfloat16 activations, whose 8-bit mantissa alone costs the embedded model a tenth of its
    greedy tokens against float32 (89 % agree); so x goes in as two bfloat16 rows per token, its rounding and
    the remainder (16 bits kept: 96 % agree), stacked into one product that reads the weights once."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    # both rows written in place (3 ops, not 4; a decode step runs 120 of these products, each op a few us)
    rows = torch.empty(2 * m, x2.shape[1], dtype=ACTIVATION_DTYPE)
    high, low = rows[:m], rows[m:]
    high.copy_(x2)
    torch.sub(x2, high, out=low)
    out = torch._weight_int4pack_mm_for_cpu(rows, weight.packed, weight.group_size, weight.scales_and_zeros)
    out = out.view(2, m, -1).sum(0, dtype=x.dtype)  # the two products summed in x's dtype
    if bias is not None:
        out += bias
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])
