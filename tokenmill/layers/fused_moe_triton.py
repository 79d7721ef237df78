"""The experts of a MoE layer on the GPU: one grouped-GEMM launch per projection over all experts.

The T * k (token, expert) pairs, numbered pair = token * k + slot, are sorted by expert and each expert's run
is padded to a whole number of BLOCK_M rows (moe_align_block_size), so every block of rows belongs to one
expert; a padding row holds the id T * k and is neither read nor written:

    sorted_pair_ids  [ e0 e0 e0 -- | e1 -- -- -- | e3 e3 e3 e3 | e3 -- -- -- | -- (unused blocks) ]
    block_expert_ids [     0       |      1      |      3      |      3      |  ... ]

The GEMM kernel's program (row block, column block) multiplies its rows of A, gathered through the pair ids,
by its expert's matrix and writes rows of C indexed by pair id. Gate/up reads A = x (row pair // k) into
[T * k, 2I]; SiLU * up gives [T * k, I]; down reads those rows (row pair) and scales them by the router's
weight; the k rows of a token are summed last. Sizes are bounded without reading the device (T * k +
E * (BLOCK_M - 1) rows at most), so nothing waits on the GPU and the launch suits CUDA graphs: blocks past
the padded total return at once. With biases (GPT-OSS) each row adds its expert's bias row before the
router's weight; the activation between the two launches is SiLU * up (a Triton kernel) or GPT-OSS's clamped
SwiGLU (fused_moe.swiglu_oai, elementwise torch).

With expert parallelism a rank holds E of the layer's experts, and the id E marks a pair whose expert another
rank holds: such pairs are sorted after the last padded block, no block covers them, and their rows of the
down projection are zero.

FP8 experts (quantization/fp8_moe.py): B is e4m3 and A is quantized to e4m3 before each launch, per token (or
with a static per-tensor scale) against per-channel weight scales [E, N], or per token group of block_k
columns against block scales [E, row blocks, ceil(K / block_k)]. Per channel, the program's float32 sum is
scaled once at the end (its row's activation scale times its column's weight scale); block-scaled, a K tile is
one scale block and each tile's product is scaled before it is added. w13's block scales hold the gate's and
the up's rows of blocks one after the other (each half ceil(I / block_n) rows), so a row's scale row is
counted within its half (`segment_rows` = I).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX
from tokenmill.layers.fp8_ops import quant_fp8
from tokenmill.layers.fused_moe import gated_activation
from tokenmill.layers.triton_ops import silu_and_mul

# How the kernel scales its products: not at all (16- or 32-bit operands), per channel, or per block.
NO_SCALES, CHANNEL_SCALES, BLOCK_SCALES, MXFP4_SCALES = 0, 1, 2, 3


@dataclass(frozen=True)
class Fp8ExpertWeights:
    """The scales of one projection's e4m3 experts. weight_scale: [E, N] per channel, or with block_size
    (block_n, block_k) [E, row blocks, ceil(K / block_k)], the rows counted in segments of segment_rows (w13:
    gate, then up; w2: N). input_scale: a static per-tensor activation scale (float32 scalar); None: dynamic,
    per token, or per token group of block_k."""

    weight_scale: torch.Tensor
    block_size: tuple[int, int] | None = None
    segment_rows: int = 0
    input_scale: torch.Tensor | None = None

    def quantize_input(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a [rows, K] -> (e4m3 [rows, K], float32 scales [rows, groups])."""
        if self.input_scale is not None:
            q = (a.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            return q, self.input_scale.reshape(1, 1).expand(a.shape[0], 1)
        return quant_fp8(a, self.block_size[1] if self.block_size is not None else None)


@dataclass(frozen=True)
class GemmConfig:
    """The grouped GEMM's tiles and launch: block_m rows per block (the routing's padding unit)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def gemm_config(num_tokens: int, num_experts: int, top_k: int = 1) -> GemmConfig:
    """Tiles by the step's size: while tokens are few (an expert gets about one row), 16-row blocks pad little
    and the kernel streams weights; with many, 64-row tensor-core tiles; from 128 rows an expert on (a long
    prompt's step), 128 x 128 tiles over 8 warps (kernel_bench.py --moe --tune, Qwen3-30B-A3B's experts at 4,096
    tokens on an H100: 1.14 ms against 1.66 for 64 x 64)."""
    if num_tokens <= num_experts:
        return GemmConfig(16, 64, 64, 4, 3)
    if num_tokens * top_k >= 128 * num_experts:
        return GemmConfig(128, 128, 64, 8, 3)
    return GemmConfig(64, 64, 64, 4, 3)


@triton.jit
def _softmax_topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_l, scale, TOP_K: tl.constexpr,
                         K_PAD: tl.constexpr, E_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):
    # One token: softmax over its experts' logits in float32, the TOP_K largest (the lowest id first among equal
    # scores), renormalized to sum to 1 if RENORMALIZE, times `scale`.
    token = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_PAD)
    logits = tl.load(logits_ptr + token * stride_l + e, mask=e < num_experts, other=-float("inf")).to(tl.float32)
    exp = tl.exp(logits - tl.max(logits, 0))
    remaining = tl.where(e < num_experts, exp / tl.sum(exp, 0), -1.0)
    slots = tl.arange(0, K_PAD)
    chosen = tl.zeros([K_PAD], tl.float32)
    chosen_ids = tl.zeros([K_PAD], tl.int64)
    for slot in tl.static_range(TOP_K):
        best = tl.max(remaining, 0)
        best_id = tl.min(tl.where(remaining == best, e, E_PAD), 0)
        chosen = tl.where(slots == slot, best, chosen)
        chosen_ids = tl.where(slots == slot, best_id.to(tl.int64), chosen_ids)
        remaining = tl.where(e == best_id, -1.0, remaining)
    if RENORMALIZE:
        chosen = chosen / tl.sum(chosen, 0)
    tl.store(weights_ptr + token * TOP_K + slots, chosen * scale, mask=slots < TOP_K)
    tl.store(ids_ptr + token * TOP_K + slots, chosen_ids, mask=slots < TOP_K)


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool, scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """select_experts' softmax routing in one launch: router_logits [T, E] (last dim contiguous) -> (weights
    [T, k] float32, ids [T, k] int64)."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens:
        _softmax_topk_kernel[(num_tokens,)](router_logits, weights, ids, num_experts, router_logits.stride(0), scale,
                                            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
                                            E_PAD=triton.next_power_of_2(num_experts), RENORMALIZE=renormalize)
    return weights, ids


ALIGN_CHUNK = 1024  # pairs per program of the routing sort's counting and scattering kernels


@triton.jit
def _count_pairs_kernel(ids_ptr, counts_ptr, num_pairs, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    tl.atomic_add(counts_ptr + ids, tl.full([CHUNK], 1, tl.int32), mask=mask)


@triton.jit
def _scatter_pairs(ids_ptr, cursors_ptr, sorted_pair_ids_ptr, offs, num_pairs):
    """Each pair to its expert's next row (the cursors advance by atomics)."""
    mask = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    rows = tl.atomic_add(cursors_ptr + ids, tl.full(offs.shape, 1, tl.int32), mask=mask)
    tl.store(sorted_pair_ids_ptr + rows, offs, mask=mask)


@triton.jit
def _scatter_pairs_kernel(ids_ptr, cursors_ptr, sorted_pair_ids_ptr, num_pairs, CHUNK: tl.constexpr):
    _scatter_pairs(ids_ptr, cursors_ptr, sorted_pair_ids_ptr, tl.program_id(0) * CHUNK + tl.arange(0, CHUNK),
                   num_pairs)


@triton.jit
def _plan_blocks_kernel(ids_ptr, counts_ptr, cursors_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr,
                        num_rows_padded_ptr, num_pairs, NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr,
                        BLOCK_M: tl.constexpr, FILL_CHUNK: tl.constexpr, ALONE: tl.constexpr):
    # Each expert's run padded to whole blocks, the pairs held elsewhere (id NUM_EXPERTS) after them unpadded;
    # each run's first row becomes its cursor, every row the padding id, each block its expert. ALONE (every
    # pair fits one program of ALONE pairs): this program also counts the pairs first and scatters them last,
    # the cursors' memory holding the counts until they are read.
    e = tl.arange(0, E_PAD)
    if ALONE:
        tl.store(cursors_ptr + e, tl.zeros([E_PAD], tl.int32))
        tl.debug_barrier()
        offs = tl.arange(0, ALONE)
        tl.atomic_add(cursors_ptr + tl.load(ids_ptr + offs, mask=offs < num_pairs, other=0),
                      tl.full([ALONE], 1, tl.int32), mask=offs < num_pairs)
        tl.debug_barrier()
        counts = tl.load(cursors_ptr + e, cache_modifier=".cg")  # the atomics' sums, from L2 (not a stale L1 line)
        tl.debug_barrier()
    else:
        counts = tl.load(counts_ptr + e, mask=e <= NUM_EXPERTS, other=0)
    is_expert = e < NUM_EXPERTS
    runs = tl.where(is_expert, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, tl.where(e == NUM_EXPERTS, counts, 0))
    ends = tl.cumsum(runs, 0)
    starts = ends - runs
    tl.store(cursors_ptr + e, starts, mask=e <= NUM_EXPERTS)
    padded_total = tl.sum(tl.where(is_expert, runs, 0), 0)
    tl.store(num_rows_padded_ptr, padded_total)
    # Only rows and blocks before the padded total are read (the GEMM's later blocks return at once).
    for row0 in range(0, padded_total, FILL_CHUNK):
        rows = row0 + tl.arange(0, FILL_CHUNK)
        tl.store(sorted_pair_ids_ptr + rows, tl.full([FILL_CHUNK], 0, tl.int32) + num_pairs, mask=rows < padded_total)
    num_blocks = tl.where(is_expert, runs // BLOCK_M, 0)
    for block in range(0, tl.max(num_blocks, 0)):  # every expert's block-th block at once
        tl.store(block_expert_ids_ptr + starts // BLOCK_M + block, e, mask=block < num_blocks)
    if ALONE:
        tl.debug_barrier()
        _scatter_pairs(ids_ptr, cursors_ptr, sorted_pair_ids_ptr, tl.arange(0, ALONE), num_pairs)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] (an id of num_experts: held elsewhere) -> (sorted_pair_ids [max_rows] int32, padding
    rows = T * k; block_expert_ids [max_rows / block_m] int32; num_rows_padded [1] int32, the rows in use),
    max_rows = T * k + E * (block_m - 1) rounded up to block_m. Rows and blocks past num_rows_padded are left
    unwritten, but for the pairs held elsewhere that follow it (nothing reads them). Up to ALIGN_CHUNK pairs
    (decode steps) one program counts the pairs per expert, plans the padded blocks and scatters the pairs to
    their runs' rows; more take four launches (counters zeroed, counted, planned, scattered). The routing runs
    once per MoE layer and step, where a sort built of torch ops took some 25 small kernels. The order of pairs
    within an expert's run follows the atomics (each pair's row is computed alone, so outputs do not depend on
    it)."""
    flat_ids = topk_ids.flatten()
    num_pairs = flat_ids.numel()
    device = flat_ids.device
    max_rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    e_pad = triton.next_power_of_2(num_experts + 1)
    sorted_pair_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(max_rows // block_m, dtype=torch.int32, device=device)
    num_rows_padded = torch.empty(1, dtype=torch.int32, device=device)
    alone = num_pairs <= ALIGN_CHUNK
    counters = (torch.empty if alone else torch.zeros)(2, e_pad, dtype=torch.int32, device=device)  # counts, cursors
    grid = (triton.cdiv(num_pairs, ALIGN_CHUNK),)
    if not alone:
        _count_pairs_kernel[grid](flat_ids, counters[0], num_pairs, CHUNK=ALIGN_CHUNK)
    _plan_blocks_kernel[(1,)](flat_ids, counters[0], counters[1], sorted_pair_ids, block_expert_ids, num_rows_padded,
                              num_pairs, NUM_EXPERTS=num_experts, E_PAD=e_pad, BLOCK_M=block_m,
                              FILL_CHUNK=1024, ALONE=triton.next_power_of_2(num_pairs) if alone else 0)
    if not alone:
        _scatter_pairs_kernel[grid](flat_ids, counters[1], sorted_pair_ids, num_pairs, CHUNK=ALIGN_CHUNK)
    return sorted_pair_ids, block_expert_ids, num_rows_padded


@triton.jit
def _e2m1_values(codes, dtype: tl.constexpr):
    """e2m1 codes (int32, 0..15: a sign bit over 2 exponent bits and 1 mantissa bit) -> their values 0, 0.5, 1,
    1.5, 2, 3, 4, 6 (negated from 8 on) in `dtype`, built from their bits."""
    exp, mantissa, sign = (codes >> 1) & 3, codes & 1, codes >> 3
    if dtype == tl.float32:
        bits = tl.where(exp > 0, ((exp + 126) << 23) | (mantissa << 22), mantissa * (126 << 23)) | (sign << 31)
        values = bits.to(tl.float32, bitcast=True)
    elif dtype == tl.bfloat16:
        bits = tl.where(exp > 0, ((exp + 126) << 7) | (mantissa << 6), mantissa * (126 << 7)) | (sign << 15)
        values = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        bits = tl.where(exp > 0, ((exp + 14) << 10) | (mantissa << 9), mantissa * (14 << 10)) | (sign << 15)
        values = bits.to(tl.int16).to(tl.float16, bitcast=True)
    return values


@triton.jit
def _mxfp4_tile(acc, a_row_ptrs, b_col_ptrs, exponent_ptrs, k0, K, is_pair, n_mask, BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """acc + A[:, k0:k0 + BLOCK_K] @ the MXFP4 weights' values there, 32 k (one exponent, 16 bytes a column) at a
    time: the bytes' low nibbles (even k) meet A's even columns, the high ones its odd columns, and the group's
    power of two scales the sum."""
    j = tl.arange(0, 16)
    for group in tl.static_range(BLOCK_K // 32):
        kg = k0 + group * 32
        in_k = (kg + 2 * j) < K  # [16]: the group lies inside K or past it
        packed = tl.load(b_col_ptrs + (kg // 2 + j)[:, None], mask=in_k[:, None] & n_mask[None, :], other=0)
        packed = packed.to(tl.int32)
        a_even = tl.load(a_row_ptrs + (kg + 2 * j)[None, :], mask=is_pair[:, None] & in_k[None, :], other=0.0)
        a_odd = tl.load(a_row_ptrs + (kg + 2 * j + 1)[None, :], mask=is_pair[:, None] & in_k[None, :], other=0.0)
        part = tl.dot(a_even, _e2m1_values(packed & 15, a_even.dtype), input_precision=DOT_PRECISION)
        part = tl.dot(a_odd, _e2m1_values(packed >> 4, a_odd.dtype), part, input_precision=DOT_PRECISION)
        group_in_k = (n_mask.to(tl.int32) * 0 + kg) < K  # [N]
        exponents = tl.load(exponent_ptrs + kg // 32, mask=n_mask & group_in_k, other=0).to(tl.int32)
        acc += part * (exponents << 23).to(tl.float32, bitcast=True)[None, :]  # 2^(e - 127), e in 1..254
    return acc


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, sorted_pair_ids_ptr,
                         block_expert_ids_ptr, num_rows_padded_ptr, N, K, num_pairs, stride_am, stride_be, stride_bn,
                         stride_cm, stride_bias_e, stride_as_m, stride_bs_e, stride_bs_n, segment_rows,
                         PAIRS_PER_A_ROW: tl.constexpr, MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SCALES: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # C[pair, n] = (sum_k A[pair // PAIRS_PER_A_ROW, k] * B[expert, n, k] (x their scales, SCALES)
    #               (+ bias[expert, n] if HAS_BIAS)) (x weights[pair] if MUL_WEIGHT)
    # MXFP4 (SCALES 3): B holds two e2m1 codes a byte along k, b_scale one E8M0 exponent per 32 of k (BLOCK_K a
    # multiple of 32).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_rows_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    pair_ids = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    is_pair = pair_ids < num_pairs
    a_rows = (pair_ids // PAIRS_PER_A_ROW).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_cols = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
    b_ptrs = b_cols + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    a_scale_ptrs = a_scale_ptr + a_rows * stride_as_m
    if SCALES == 3:  # each column's exponents
        b_scale_ptrs = b_scale_ptr + expert * stride_bs_e + offs_n.to(tl.int64) * stride_bs_n
    elif SCALES == 2:  # this column's row of blocks, counted within its segment
        scale_rows = (offs_n // segment_rows) * tl.cdiv(segment_rows, SCALE_BLOCK_N) \
            + (offs_n % segment_rows) // SCALE_BLOCK_N
        b_scale_ptrs = b_scale_ptr + expert * stride_bs_e + scale_rows.to(tl.int64) * stride_bs_n
    else:
        b_scale_ptrs = b_scale_ptr + expert * stride_bs_e + offs_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if SCALES == 3:
            acc = _mxfp4_tile(acc, a_ptr + a_rows[:, None] * stride_am, b_cols, b_scale_ptrs, k0, K, is_pair, n_mask,
                              BLOCK_K, DOT_PRECISION)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs + k0, mask=is_pair[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if SCALES == 2:  # BLOCK_K is the scales' block_k: tile k0 // BLOCK_K is one block
                a_scale = tl.load(a_scale_ptrs + k0 // BLOCK_K, mask=is_pair, other=0.0)
                b_scale = tl.load(b_scale_ptrs + k0 // BLOCK_K, mask=n_mask, other=0.0)
                acc += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if SCALES == 1:
        acc = acc * tl.load(a_scale_ptrs, mask=is_pair, other=0.0)[:, None] \
            * tl.load(b_scale_ptrs, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair_ids, mask=is_pair, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pair_ids[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=is_pair[:, None] & n_mask[None, :])


def grouped_gemm(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, sorted_pair_ids: torch.Tensor,
                 block_expert_ids: torch.Tensor, num_rows_padded: torch.Tensor, pairs_per_a_row: int,
                 config: GemmConfig, pair_weights: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 fp8: Fp8ExpertWeights | None = None, mxfp4_scales: torch.Tensor | None = None) -> None:
    """out[pair] = (a[pair // pairs_per_a_row] @ weight[expert of pair].T (+ bias[expert of pair]))
    (x pair_weights[pair]), for the pairs of moe_align_block_size (config.block_m). a [rows, K], weight [E, N, K],
    bias [E, N], out [num_pairs, N]; last dims contiguous. `fp8`: weight is e4m3 with these scales, and `a`
    is quantized here. `mxfp4_scales` uint8 [E, N, K / 32]: weight is MXFP4, uint8 [E, N, K / 2] (two codes a
    byte, quantization/mxfp4.py's layout with its blocks flattened)."""
    num_pairs, n = out.shape
    k = a.shape[1]
    if mxfp4_scales is not None and (weight.dtype != torch.uint8 or k % 32 or weight.shape[2] * 2 != k
                                     or mxfp4_scales.shape != (*weight.shape[:2], k // 32)
                                     or mxfp4_scales.stride(2) != 1):
        raise ValueError(f"grouped_gemm: MXFP4 weight {weight.dtype} {tuple(weight.shape)} with scales "
                         f"{tuple(mxfp4_scales.shape)} do not fit K = {k} (uint8 [E, N, K / 2] and [E, N, K / 32])")
    if weight.shape[1:] != (n, k if mxfp4_scales is None else k // 2) or a.stride(1) != 1 or weight.stride(2) != 1 \
            or out.stride(1) != 1 \
            or (bias is not None and (bias.shape != weight.shape[:2] or bias.stride(1) != 1)):
        raise ValueError(f"grouped_gemm: a {tuple(a.shape)}, weight {tuple(weight.shape)} and out "
                         f"{tuple(out.shape)} do not fit, or a last dim is strided")
    block_m, block_n, block_k = config.block_m, config.block_n, config.block_k
    scales, scale_block_n, segment_rows = NO_SCALES, 1, 1
    a_scale = b_scale = out  # (placeholders, unread)
    if mxfp4_scales is not None:  # whole groups of 32 k a tile
        scales, b_scale, block_k = MXFP4_SCALES, mxfp4_scales, max(32, block_k // 32 * 32)
    if fp8 is not None:
        a, a_scale = fp8.quantize_input(a)
        b_scale = fp8.weight_scale
        if fp8.block_size is None:
            scales = CHANNEL_SCALES
            expected = weight.shape[:2]
        else:
            scales, (scale_block_n, block_k), segment_rows = BLOCK_SCALES, fp8.block_size, fp8.segment_rows
            expected = (weight.shape[0], n // segment_rows * triton.cdiv(segment_rows, scale_block_n),
                        triton.cdiv(k, block_k))
        if weight.dtype != FP8_DTYPE or b_scale.shape != expected or b_scale.stride(-1) != 1 \
                or (scales == BLOCK_SCALES and (n % segment_rows or block_k < 16 or block_k & (block_k - 1))):
            raise ValueError(f"grouped_gemm: FP8 weight {weight.dtype} {tuple(weight.shape)} with scales "
                             f"{tuple(b_scale.shape)} (expected e4m3 and {tuple(expected)}, block_k a power of two "
                             f">= 16), blocks {fp8.block_size}, segments of {segment_rows} rows")
    grid = (sorted_pair_ids.numel() // block_m, triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](a, weight, out, pair_weights if pair_weights is not None else out,
                               bias if bias is not None else out, a_scale, b_scale, sorted_pair_ids, block_expert_ids,
                               num_rows_padded, n, k, num_pairs, a.stride(0), weight.stride(0), weight.stride(1),
                               out.stride(0), bias.stride(0) if bias is not None else 0,
                               a_scale.stride(0), b_scale.stride(0), b_scale.stride(1) if scales else 0,
                               segment_rows, PAIRS_PER_A_ROW=pairs_per_a_row, MUL_WEIGHT=pair_weights is not None,
                               HAS_BIAS=bias is not None, SCALES=scales, SCALE_BLOCK_N=scale_block_n,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                               num_warps=config.num_warps, num_stages=config.num_stages)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, config: GemmConfig | None = None, *, w13_bias: torch.Tensor | None = None,
                  w2_bias: torch.Tensor | None = None, activation: str = "silu", some_held_elsewhere: bool = False,
                  w13_fp8: Fp8ExpertWeights | None = None, w2_fp8: Fp8ExpertWeights | None = None,
                  w13_mxfp4_scales: torch.Tensor | None = None, w2_mxfp4_scales: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_weights / topk_ids [T, k] ->
    [T, H] in x's dtype. config: the GEMMs' tiles (gemm_config's by default).
    w13_bias [E, 2I], w2_bias [E, H]: optional biases; activation: "silu" or "swigluoai" (fused_moe).
    some_held_elsewhere: ids of E may occur (expert parallelism); their pairs add nothing.
    w13_fp8 / w2_fp8: the scales of e4m3 experts; w13_mxfp4_scales / w2_mxfp4_scales: those of MXFP4 experts
    (w13 [E, 2I, H / 2], w2 [E, H, I / 2] uint8, see grouped_gemm)."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    config = config or gemm_config(num_tokens, num_experts, top_k)
    sorted_pair_ids, block_expert_ids, num_rows_padded = moe_align_block_size(topk_ids, config.block_m, num_experts)
    routing = (sorted_pair_ids, block_expert_ids, num_rows_padded)
    # No block writes the rows of pairs held elsewhere: zero, they add nothing to the sum (and the activation
    # never sees uninitialized memory).
    new_rows = torch.zeros if some_held_elsewhere else torch.empty
    gate_up = new_rows(num_tokens * top_k, w13.shape[1], dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, gate_up, *routing, pairs_per_a_row=top_k, config=config, bias=w13_bias, fp8=w13_fp8,
                 mxfp4_scales=w13_mxfp4_scales)
    down = new_rows(num_tokens * top_k, w2.shape[1], dtype=x.dtype, device=x.device)
    hidden = silu_and_mul(gate_up) if activation == "silu" else gated_activation(gate_up, activation)
    grouped_gemm(hidden, w2, down, *routing, pairs_per_a_row=1, config=config,
                 pair_weights=topk_weights.flatten(), bias=w2_bias, fp8=w2_fp8, mxfp4_scales=w2_mxfp4_scales)
    return down.view(num_tokens, top_k, -1).sum(dim=1)
