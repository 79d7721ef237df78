"""Block-scaled 8-bit weights on the GPU (block_int8.py's layout: codes int8 [K, N], scale and zero
[K / group, N]): a Triton GEMM that dequantizes in registers.

Each program computes a BLOCK_M x BLOCK_N tile of x @ W.T, streaming the codes once in BLOCK_K-row tiles: an int8
load, the scale (and zero) of each row's block, a fused multiply-add per weight, then a tensor-core dot
accumulated in float32. BLOCK_K need not be a multiple of the group (Q6_K's blocks are 16 rows): every row reads
its own block's scale, which the cache serves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.layers.quantization.block_int8 import BlockInt8Weight

BLOCK_K = 32  # rows of the codes per dot; every GGUF type's K is a multiple of it


@triton.jit
def _block_int8_gemm_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                            stride_ck, stride_sg, stride_om, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    codes_ptrs = codes_ptr + offs_k[:, None].to(tl.int64) * stride_ck + offs_n[None, :]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        codes = tl.load(codes_ptrs, mask=n_mask[None, :], other=0).to(tl.float32)
        block_offs = ((k0 + offs_k) // GROUP)[:, None].to(tl.int64) * stride_sg + offs_n[None, :]
        w = codes * tl.load(scale_ptr + block_offs, mask=n_mask[None, :], other=0.0).to(tl.float32)
        if HAS_ZERO:
            w += tl.load(zero_ptr + block_offs, mask=n_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
        codes_ptrs += BLOCK_K * stride_ck
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def block_int8_gemm(x: torch.Tensor, weight: BlockInt8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) in x's dtype; K a multiple of BLOCK_K."""
    k, n = weight.codes.shape
    if k % BLOCK_K or weight.codes.stride(1) != 1 or weight.scale.stride(1) != 1:
        raise ValueError(f"block int8 GEMM: K={k} must be a multiple of {BLOCK_K}, codes and scales row-major")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 32 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    zero = weight.zero if weight.zero is not None else weight.scale
    _block_int8_gemm_kernel[grid](x2, weight.codes, weight.scale, zero, bias if bias is not None else out, out, m, n,
                                  k, x2.stride(0), weight.codes.stride(0), weight.scale.stride(0), out.stride(0),
                                  GROUP=weight.group, HAS_ZERO=weight.zero is not None, HAS_BIAS=bias is not None,
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
                                  DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
                                  num_stages=3)
    return out.reshape(*x.shape[:-1], n)
