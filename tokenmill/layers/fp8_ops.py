"""FP8 (e4m3) kernels in Triton: activation quantization, the block-scaled GEMM, and the batch-1 GEMV over FP8
weights. Each is checked against float64 in tests/layers/test_fp8_ops.py (under the interpreter on the CPU).

Scales multiply: a value is `q * scale`, with q the e4m3 number (at most 448 in magnitude).

    activations  per token: one scale per row; per token group: one per (row, group of `group` columns)
    weights      per channel: one scale per output row; block-scaled: one per (block_n rows x block_k columns)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX, MIN_SCALE

# Triton's interpreter converts float32 to e4m3 rounding half up and dropping mantissa carries (Triton 3.9:
# 125.8 -> 64); under it, values are first rounded to the e4m3 grid (round_e4m3), so that what the CPU tests
# store is what the GPU's conversion (round to nearest even, saturating) stores.
ROUND_E4M3 = os.environ.get("TRITON_INTERPRET") == "1"


def scale_pointer(scale: torch.Tensor | float, kv_cache: torch.Tensor) -> torch.Tensor:
    """A KV-cache scale as the float32 tensor the kernels read: the layer's own parameter in the engine, so a
    CUDA graph replays with whatever it holds now; a number (tests, benchmarks) becomes a tensor. A cache in
    the model's dtype reads no scale, and gets the cache itself as a placeholder."""
    if kv_cache.dtype != FP8_DTYPE:
        return kv_cache
    if isinstance(scale, torch.Tensor):
        return scale
    return torch.tensor(float(scale), dtype=torch.float32, device=kv_cache.device)


@triton.jit
def round_e4m3(x):
    """x (float32, |x| <= 448) rounded to the nearest e4m3 value, ties to even: steps of 2^(e - 3) for
    normal numbers, 2^-9 below 2^-6."""
    a = tl.abs(x)
    step = tl.exp2(tl.floor(tl.log2(tl.maximum(a, 0.015625))) - 3.0)
    a = ((a / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: float32 addition rounds to an integer
    return tl.where(x < 0, -a, a)


@triton.jit
def _quant_fp8_kernel(x_ptr, q_ptr, scale_ptr, x_stride, q_stride, num_cols, num_groups, GROUP: tl.constexpr,
                      BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                      ROUND_E4M3: tl.constexpr):
    # One program per (row, group of GROUP columns): the group's absolute maximum, then its values over the scale.
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    start = group * GROUP
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, GROUP, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        mask = (offset + tl.arange(0, BLOCK) < GROUP) & (cols < num_cols)
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    for offset in range(0, GROUP, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        mask = (offset + tl.arange(0, BLOCK) < GROUP) & (cols < num_cols)
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        if ROUND_E4M3:
            q = round_e4m3(q)
        tl.store(q_ptr + row * q_stride + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * num_groups + group, scale)


def quant_fp8(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] (any float dtype, contiguous columns) -> (q [rows, cols] e4m3, scales float32): one scale per
    row (group None: per token, [rows, 1]) or per `group` columns ([rows, ceil(cols / group)])."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"quant_fp8 needs a [rows, cols] tensor with contiguous columns, got {tuple(x.shape)}")
    rows, cols = x.shape
    group = group or cols
    num_groups = triton.cdiv(cols, group)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(rows, num_groups, dtype=torch.float32, device=x.device)
    if rows:
        block = min(triton.next_power_of_2(group), 1024)
        _quant_fp8_kernel[(rows, num_groups)](x, q, scales, x.stride(0), q.stride(0), cols, num_groups, GROUP=group,
                                              BLOCK=block, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
                                              ROUND_E4M3=ROUND_E4M3, num_warps=4)
    return q, scales


@triton.jit
def _block_fp8_matmul_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_am,
                             stride_bn, stride_om, stride_as_m, stride_bs_n, SCALE_BLOCK_N: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    # out [M, N] = sum over K tiles of (a_tile @ b_tile.T) * a_scale[m, kt] * b_scale[n // SCALE_BLOCK_N, kt]: a
    # K tile is one scale block (BLOCK_K = the scale's block_k), so each tile's product is scaled once.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    a_scale_ptrs = a_scale_ptr + offs_m.to(tl.int64) * stride_as_m
    b_scale_ptrs = b_scale_ptr + (offs_n // SCALE_BLOCK_N).to(tl.int64) * stride_bs_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kt * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_scale = tl.load(a_scale_ptrs + kt, mask=m_mask, other=0.0)
        b_scale = tl.load(b_scale_ptrs + kt, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def block_fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     block_size: tuple[int, int], out_dtype: torch.dtype, bias: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """a [M, K] e4m3 with a_scale [M, ceil(K / block_k)] (per token group), b [N, K] e4m3 with b_scale
    [ceil(N / block_n), ceil(K / block_k)] (block-scaled, as DeepSeek-V3 and Qwen3-FP8 ship weights) ->
    [M, N] in out_dtype, accumulated in float32."""
    block_n, block_k = block_size
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K or a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError(f"block_fp8_matmul needs a [M, K] and b [N, K] with contiguous K, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a_scale.shape != (M, triton.cdiv(K, block_k)) or b_scale.shape != (triton.cdiv(N, block_n),
                                                                           triton.cdiv(K, block_k)):
        raise ValueError(f"scales {tuple(a_scale.shape)} / {tuple(b_scale.shape)} do not match blocks {block_size}")
    if block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"block_fp8_matmul needs block_k a power of two >= 32 (an FP8 tensor-core tile), "
                         f"got {block_k}")
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    block_m = 16 if M <= 16 else 64
    block_nt = min(128, block_n)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_nt))
    _block_fp8_matmul_kernel[grid](a, b, out, a_scale, b_scale, bias if bias is not None else out, M, N, K,
                                   a.stride(0), b.stride(0), out.stride(0), a_scale.stride(0), b_scale.stride(0),
                                   SCALE_BLOCK_N=block_n, HAS_BIAS=bias is not None, BLOCK_M=block_m,
                                   BLOCK_N=block_nt, BLOCK_K=block_k, num_warps=4, num_stages=3)
    return out


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, w_stride, scale_stride,
                     SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Each program streams BLOCK_N whole rows of the e4m3 weight. Per-channel scales (SCALE_BLOCK_K == 0) scale
    # the row sums once; block scales scale each K tile's partial sums (BLOCK_K == SCALE_BLOCK_K).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_rows = tl.minimum(rows, N - 1)
    w_rows = w_ptr + safe_rows.to(tl.int64)[:, None] * w_stride
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        col_mask = k + cols < K
        x = tl.load(x_ptr + k + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + (k + cols)[None, :], mask=col_mask[None, :], other=0.0).to(tl.float32)
        partial = tl.sum(w * x[None, :], axis=1)
        if SCALE_BLOCK_K > 0:
            partial *= tl.load(scale_ptr + (safe_rows // SCALE_BLOCK_N).to(tl.int64) * scale_stride
                               + k // SCALE_BLOCK_K)
        acc += partial
    if SCALE_BLOCK_K == 0:
        acc *= tl.load(scale_ptr + safe_rows)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             block_size: tuple[int, int] | None = None, block_n: int | None = None) -> torch.Tensor:
    """x [1, K] (16-bit) @ (weight [N, K] e4m3 times its scales).T (+ bias) -> [1, N] in x's dtype, for batch-1
    decode: the weights are streamed once at 1 byte each, the activations stay unquantized. `scale`: [N] per
    channel, or [ceil(N / block_n), ceil(K / block_k)] with `block_size` (block_n, block_k)."""
    n, k = weight.shape
    if x.shape != (1, k) or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"fp8_gemv needs x [1, K] and weight [N, K] with contiguous K, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if block_size is None:
        if scale.numel() != n:
            raise ValueError(f"fp8_gemv: per-channel scale must have {n} entries, got {tuple(scale.shape)}")
        scale_block_n, scale_block_k, block_k, scale_stride = 1, 0, (1024 if k >= 4096 else 512), 0
    else:
        scale_block_n, scale_block_k = block_size
        block_k, scale_stride = scale_block_k, scale.stride(0)
    block_n = block_n or (8 if k >= 4096 else 4)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, scale, bias if bias is not None else x, out, n, k,
                                                 weight.stride(0), scale_stride, SCALE_BLOCK_N=scale_block_n,
                                                 SCALE_BLOCK_K=scale_block_k, HAS_BIAS=bias is not None,
                                                 BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if k >= 4096 else 4)
    return out


@triton.jit
def _fp8_small_m_kernel(x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                        stride_om, FP8_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out [M, N] = x [M, K] @ (w [N, K] e4m3 x w_scale [N]).T on the tensor cores, for the few rows of a decode
    # batch: one program per (BLOCK_N outputs, BLOCK_M rows), narrow tiles so that the weight streams through
    # every SM. FP8_INPUT: x is e4m3 with one scale per row and both operands go to the FP8 MMA as they are;
    # otherwise x stays 16-bit and each weight tile widens to fp16 (one conversion per pair of e4m3 values).
    pid_n = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    safe_n = tl.minimum(offs_n, N - 1)  # rows past N read row N - 1, and are not stored
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + safe_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptrs)
        if FP8_INPUT:
            acc = tl.dot(x, w, acc)
        else:
            acc = tl.dot(x.to(tl.float16), w.to(tl.float16), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = acc * tl.load(w_scale_ptr + safe_n)[None, :]
    if FP8_INPUT:
        acc = acc * tl.load(x_scale_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])


# Rows up to which fp8_small_m takes 16-bit activations (no quantization), and up to which it runs at all.
SMALL_M_16BIT_ROWS, SMALL_M_ROWS = 16, 64


def fp8_small_m_supported(m: int, k: int) -> bool:
    return 2 <= m <= SMALL_M_ROWS and k % 512 == 0


def fp8_small_m(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [M, K] (16-bit, 2 <= M <= 64, K a multiple of 512) @ (weight [N, K] e4m3 x scale [N]).T (+ bias) -> [M, N]
    in x's dtype, for small decode batches where torch._scaled_mm's tiles leave most SMs idle. Up to 16 rows the
    activations stay 16-bit (as fp16 on the tensor cores), above they are quantized per token. Tiles measured on
    the H100 and H200 (Llama-3.1-8B's projections): narrow N tiles, long K tiles, deep pipelines."""
    m, k = x.shape
    n = weight.shape[0]
    if not fp8_small_m_supported(m, k) or x.stride(-1) != 1 or weight.stride(-1) != 1 or weight.shape[1] != k:
        raise ValueError(f"fp8_small_m needs x [M, K] with 2 <= M <= {SMALL_M_ROWS}, K a multiple of 512 and "
                         f"weight [N, K], contiguous K; got {tuple(x.shape)} and {tuple(weight.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    fp8_input = m > SMALL_M_16BIT_ROWS
    if fp8_input:
        x, x_scale = quant_fp8(x)
        block_m, block_k = 64, 256
        block_n, stages = (64 if n >= 6144 else 32), (3 if n >= 16384 else 5)
    else:
        x_scale, block_m = scale, 16  # (x_scale unread)
        if k >= 8192 or n < 6144:
            block_n, block_k, stages = 32, 512, 5
        else:
            block_n, block_k, stages = 64, 128, (3 if n >= 16384 else 5)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _fp8_small_m_kernel[grid](x, weight, scale, x_scale, bias if bias is not None else out, out, m, n, k,
                              x.stride(0), weight.stride(0), out.stride(0), FP8_INPUT=fp8_input,
                              HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              num_warps=4, num_stages=stages)
    return out
