"""Fused elementwise kernels for the GPU: residual add + RMSNorm, RMSNorm, SiLU·mul and rotary embedding.

Each replaces several PyTorch kernels (and their memory round trips) with one pass. Rounding follows
the PyTorch code they replace: products and sums are rounded to the activation dtype where PyTorch
rounds them, so float32 results are identical and half-precision ones agree to the last bit in most
elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, x_stride, residual_stride, out_stride, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0)
        tl.store(residual_ptr + row * residual_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / HIDDEN
    normed = (xf * tl.math.rsqrt(variance + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, (weight.to(tl.float32) * normed.to(tl.float32)).to(x.dtype),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [..., hidden] (rows may be strided, last dim contiguous). With `residual` ([rows, hidden],
    contiguous), residual += x in place and the norm is of the sum. Returns a new [rows, hidden] tensor."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1 or weight.shape != (hidden,):
        raise ValueError(f"rms_norm needs a contiguous last dim and weight [{hidden}], got strides {x2.stride()} "
                         f"and weight {tuple(weight.shape)}")
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if residual is not None and (residual.shape != x2.shape or not residual.is_contiguous()):
        raise ValueError("residual must be contiguous and shaped like x")
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](x2, residual if residual is not None else x2, weight, out, x2.stride(0),
                              hidden if residual is not None else 0, hidden, eps, HIDDEN=hidden, BLOCK=block,
                              HAS_RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + N + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * out_stride + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
             mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [rows, 2 * n] = [gate | up] -> silu(gate) * up: [rows, n]."""
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs a [rows, 2n] tensor with a contiguous last dim, got {tuple(x.shape)}")
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, x.stride(0), n, N=n, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rotary_kernel(x_ptr, positions_ptr, cos_ptr, sin_ptr, x_token_stride, x_head_stride, cache_stride,
                   NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    mask = (heads[:, None] < NUM_HEADS) & col_mask[None, :]
    position = tl.load(positions_ptr + token)
    base = x_ptr + token * x_token_stride + heads[:, None] * x_head_stride + cols[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    cos = tl.load(cos_ptr + position * cache_stride + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + position * cache_stride + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    a1 = (x1.to(tl.float32) * cos[None, :]).to(dtype).to(tl.float32)
    b1 = (x2.to(tl.float32) * sin[None, :]).to(dtype).to(tl.float32)
    a2 = (x2.to(tl.float32) * cos[None, :]).to(dtype).to(tl.float32)
    b2 = (x1.to(tl.float32) * sin[None, :]).to(dtype).to(tl.float32)
    tl.store(base, (a1 - b1).to(dtype), mask=mask)
    tl.store(base + HALF, (a2 + b2).to(dtype), mask=mask)


def rotary_inplace(x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """Rotates x [tokens, heads, head_dim] (rotate-half layout) in place; caches [max_position, head_dim // 2]."""
    tokens, heads, head_dim = x.shape
    half = head_dim // 2
    if x.stride(-1) != 1 or cos_cache.shape[-1] != half or not cos_cache.is_contiguous():
        raise ValueError("rotary_inplace needs a contiguous head_dim and [max_position, head_dim/2] caches")
    if tokens == 0:
        return
    block_heads = min(16, triton.next_power_of_2(heads))
    grid = (tokens, triton.cdiv(heads, block_heads))
    _rotary_kernel[grid](x, positions, cos_cache, sin_cache, x.stride(0), x.stride(1), cos_cache.stride(0),
                         NUM_HEADS=heads, HALF=half, BLOCK_HEADS=block_heads, BLOCK_HALF=triton.next_power_of_2(half),
                         num_warps=4)
