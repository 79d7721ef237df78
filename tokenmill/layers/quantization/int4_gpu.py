"""4-bit weights on the GPU: a Triton W4A16 GEMM over weights repacked at load (AWQ, GPTQ).

Layout, for W [N, K] = (q - 8) * scale + zero with one scale and zero per `group` inputs (group >= 32):

    packed  uint8 [N, K / 2]    K in tiles of HALF_TILE * 2: a tile's first half in the low nibbles of its
                                HALF_TILE bytes, its second half in the high ones (no interleaving to undo:
                                each half is one dot product)
    scales, zeros  [K / group, N] in the activations' dtype

Each program computes a BLOCK_M x BLOCK_N tile of x @ W.T, streaming the packed weights once: a byte load, two
masks and shifts and a fused multiply-add per weight before tensor-core dots, accumulated in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HALF_TILE = 32  # K of one dot product; a tile of the layout is 2 * HALF_TILE inputs
TILE = 2 * HALF_TILE


@dataclass
class Int4GpuWeight:
    packed: torch.Tensor  # uint8 [N, K / 2]
    scales: torch.Tensor  # [K / group, N]
    zeros: torch.Tensor  # [K / group, N]
    group_size: int


def supports(in_features: int, group_size: int) -> bool:
    """Whether the layout takes this shape: whole tiles of K, groups of whole half-tiles."""
    return in_features % TILE == 0 and group_size % HALF_TILE == 0


def pack_int4_gpu(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                  dtype: torch.dtype) -> Int4GpuWeight:
    """q [N, K] (0..15), scale and zero [N, K / group_size] (w = (q - 8) * scale + zero) -> the layout above."""
    n, k = q.shape
    if not supports(k, group_size):
        raise ValueError(f"the 4-bit GPU layout needs K a multiple of {TILE} and groups a multiple of {HALF_TILE}, "
                         f"got K={k}, group {group_size}")
    tiles = q.to(torch.uint8).reshape(n, k // TILE, 2, HALF_TILE)
    packed = (tiles[:, :, 0] | (tiles[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return Int4GpuWeight(packed, scale.t().to(dtype).contiguous(), zero.t().to(dtype).contiguous(), group_size)


@triton.jit
def _int4_gemm_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                      stride_sg, stride_om, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, HALF: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, HALF)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [HALF, BLOCK_N] bytes
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(0, K // (2 * HALF)):
        k0 = tile * 2 * HALF
        x_low = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        x_high = tl.load(x_ptrs + k0 + HALF, mask=m_mask[:, None], other=0.0)
        b = tl.load(w_ptrs + tile * HALF, mask=n_mask[None, :], other=0).to(tl.int32)
        group_low = k0 // GROUP
        group_high = (k0 + HALF) // GROUP
        s_low = tl.load(scale_ptr + group_low * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z_low = tl.load(zero_ptr + group_low * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        s_high = tl.load(scale_ptr + group_high * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z_high = tl.load(zero_ptr + group_high * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w_low = ((b & 0x0F) - 8).to(tl.float32) * s_low[None, :] + z_low[None, :]
        w_high = ((b >> 4) - 8).to(tl.float32) * s_high[None, :] + z_high[None, :]
        acc += tl.dot(x_low, w_low.to(x_low.dtype), input_precision=DOT_PRECISION)
        acc += tl.dot(x_high, w_high.to(x_high.dtype), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int4_gemm(x: torch.Tensor, weight: Int4GpuWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = weight.packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 32 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](x2, weight.packed, weight.scales, weight.zeros, bias if bias is not None else out, out,
                            m, n, k, x2.stride(0), weight.packed.stride(0), weight.scales.stride(0), out.stride(0),
                            GROUP=weight.group_size, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                            HALF=HALF_TILE, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                            num_warps=4, num_stages=3)
    return out.reshape(*x.shape[:-1], n)
