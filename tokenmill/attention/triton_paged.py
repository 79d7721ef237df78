"""Paged attention in Triton: writing new keys/values into the cache, and causal attention over it.

Layouts (see backend.py):

    query            [num_tokens, num_heads, head_dim]              any strides, head_dim contiguous preferred
    key, value       [num_tokens, num_kv_heads, head_dim]           any strides (views of a fused qkv projection)
    kv_cache         [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table      [num_reqs, max_blocks_per_seq]                 int32
    seq_lens         [num_reqs]                                     int32, cached prefix + this step's tokens
    query_start_loc  [num_reqs + 1]                                 int32

One attention kernel, `_paged_attention_kernel`, covers decode, prefill and mixed steps. A program
owns one KV head and a *query tile* of BLOCK_M rows: BLOCK_Q consecutive query tokens of one request
times the GROUP query heads that share the KV head (GQA), the group padded to a power of two:

    row r of the tile  ->  token  q_start + q_tile * BLOCK_Q + r // GROUP_PAD
                           head   kv_head * GROUP + r % GROUP_PAD          (masked when >= GROUP)

so each K/V tile is loaded once for all the query heads of its KV head. Keys are walked in tiles of
BLOCK_N positions, each gathered from BLOCK_N / block_size paged blocks through the block table.
Tiles that lie entirely below the tile's first query position need no causal mask and take an
unmasked loop; the rest (the diagonal, and the partial last block) take a masked one. A layer with a
sliding window of W keys (SLIDING_WINDOW, a constexpr) starts at the key tile holding its first row's
first visible key, so tiles wholly before every row's window are never read; tiles that straddle a
row's window edge take the masked loop too. Sinks (one logit per query head) enter the online softmax
as its starting state: running max = sink, sum = 1, no value (in the first split only).

Query tiles are numbered request after request without a host-side table: with BLOCK_Q > 1, request
i owns tile ids [query_start_loc[i] // BLOCK_Q + i, query_start_loc[i+1] // BLOCK_Q + i + 1), so
num_tokens // BLOCK_Q + num_reqs tiles cover any batch (a program finds its request by binary search
and returns at once when its tile is past the request's queries); with BLOCK_Q == 1 a tile is a token.

Split-KV (flash-decoding): with more than one split, a second grid axis divides each query tile's
keys into contiguous ranges of whole key tiles. Each split writes a partial (max, sum, unnormalised acc) per row in
fp32, and `_reduce_splits_kernel` merges them. The split's key range is computed on the device from
seq_lens, and splits with nothing to do write the neutral partial (max = -inf, sum = 0), so the
decode path's grid and constexprs depend only on tensor shapes: CUDA graphs can replay it with any
sequence lengths.

Softmax runs in base 2 in fp32: scores are scaled by scale * log2(e) and exponentiated with exp2.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from tokenmill.layers.fp8_format import FP8_DTYPE
from tokenmill.layers.fp8_ops import ROUND_E4M3, round_e4m3, scale_pointer

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Decode splits aim for this many programs per streaming multiprocessor. One program fits on an SM at a
# time (its pipelined key and value tiles fill the shared memory), so more splits only add programs
# that each read a few tiles: at nano-like lengths 2 is the fastest at 8-64 requests, 4 was up to 4 %
# slower (H100).
PROGRAMS_PER_SM = 2
MAX_NUM_SPLITS = 64
# Prefill launches split only when their query tiles leave SMs idle, never into splits of fewer key tiles.
MAX_PREFILL_SPLITS = 16
MIN_TILES_PER_SPLIT = 4
# A half-precision step of one request with no cached prefix and at least this many tokens attends densely (see
# dense_causal_attention); below it the paged kernel is as fast and the step may be a captured graph.
DENSE_PREFILL_MIN_TOKENS = 1024
# Used where there is no CUDA device (the interpreter): small, so CPU tests exercise several splits.
CPU_NUM_SMS = 8
# The smallest prefill query tile on a GPU. Steps whose longest query has a few tokens read keys far
# more than they compute, so a taller tile than they fill costs little, and every short query length
# shares one compiled variant instead of one per power of two.
MIN_PREFILL_ROWS = 64


# --------------------------------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_v_tok,
    stride_v_head,
    stride_v_dim,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_c_dim,
    k_scale_ptr,
    v_scale_ptr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    ROUND_E4M3: tl.constexpr,
    HAS_VALUE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

    k = tl.load(
        key_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :] * stride_k_dim, mask=mask
    )
    block_id = slot // BLOCK_SIZE
    offset_in_block = slot % BLOCK_SIZE
    cache_offsets = (
        block_id * stride_c_block
        + offset_in_block * stride_c_slot
        + heads[:, None] * stride_c_head
        + dims[None, :] * stride_c_dim
    )
    if FP8_CACHE:  # e4m3 of value / scale (correctly rounded, as torch divides)
        k = tl.minimum(tl.maximum(tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)), -448.0), 448.0)
        if ROUND_E4M3:
            k = round_e4m3(k)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    if HAS_VALUE:  # a latent cache (MLA) has no value plane
        v = tl.load(
            value_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :] * stride_v_dim, mask=mask
        )
        if FP8_CACHE:
            v = tl.minimum(tl.maximum(tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)), -448.0), 448.0)
            if ROUND_E4M3:
                v = round_e4m3(v)
        tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor | None, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: torch.Tensor | float = 1.0, v_scale: torch.Tensor | float = 1.0) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] into kv_cache [2, num_blocks, block_size,
    num_kv_heads, head_dim] at flat slots slot_mapping [num_tokens] (int64; -1 = skip). An FP8 (e4m3) cache
    stores key / k_scale and value / v_scale. A latent cache [1, ...] (MLA) takes the key only (value None).

    key/value may have any strides. Grid: (num_tokens, cdiv(num_kv_heads, BLOCK_H)).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    has_value = value is not None
    assert not has_value or value.shape == key.shape, f"value {tuple(value.shape)} != key {tuple(key.shape)}"
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 1 + has_value, \
        f"kv_cache {tuple(kv_cache.shape)} is not [{1 + has_value}, blocks, ...]"
    assert kv_cache.shape[3:] == (num_kv_heads, head_dim), f"kv_cache {tuple(kv_cache.shape)} != key heads/dim"
    assert slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)} != ({num_tokens},)"
    assert slot_mapping.dtype in (torch.int32, torch.int64), f"slot_mapping dtype {slot_mapping.dtype}"
    assert key.device == kv_cache.device == slot_mapping.device and (not has_value or value.device == key.device)
    if num_tokens == 0:
        return
    block_size = kv_cache.shape[2]
    value = value if has_value else key  # unread without HAS_VALUE
    k_cache, v_cache = kv_cache[0], kv_cache[-1]
    block_d = _next_power_of_2(head_dim)
    # Up to 2048 elements of key (and of value) per program.
    block_h = min(_next_power_of_2(num_kv_heads), max(1, 2048 // block_d))
    grid = (num_tokens, _cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        *key.stride(),
        *value.stride(),
        *k_cache.stride(),
        scale_pointer(k_scale, kv_cache),
        scale_pointer(v_scale, kv_cache),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        FP8_CACHE=kv_cache.dtype == FP8_DTYPE,
        ROUND_E4M3=ROUND_E4M3,
        HAS_VALUE=has_value,
        num_warps=4,
    )


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    tile,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,
    row_pos,
    seq_len,
    qk_scale,
    stride_c_block,
    stride_c_slot,
    dim_offsets,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    FP8_CACHE: tl.constexpr,
):
    """One step of online softmax over keys [tile * BLOCK_N, (tile + 1) * BLOCK_N). An FP8 cache's keys and
    values are widened to the queries' dtype; their scales are applied by the caller (qk_scale holds
    k_scale, the output is multiplied by v_scale). MASKED: some key of the tile is past a row's position,
    past seq_len or (SLIDING_WINDOW > 0) before a row's window."""
    key_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        key_valid = key_pos < seq_len
        block_ids = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
    else:
        block_ids = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE)
    key_offsets = block_ids.to(tl.int64) * stride_c_block + (key_pos % BLOCK_SIZE) * stride_c_slot
    kv_offsets = key_offsets[:, None] + dim_offsets[None, :]
    if MASKED:
        if HEAD_DIM_PAD != HEAD_DIM:
            kv_mask = key_valid[:, None] & (dim_offsets[None, :] < HEAD_DIM)
        else:
            kv_mask = key_valid[:, None]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    elif HEAD_DIM_PAD != HEAD_DIM:
        dim_mask = dim_offsets[None, :] < HEAD_DIM
        k = tl.load(k_cache_ptr + kv_offsets, mask=dim_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=dim_mask, other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_offsets)
        v = tl.load(v_cache_ptr + kv_offsets)
    if FP8_CACHE:
        k = k.to(q.dtype)
        v = v.to(q.dtype)

    if DOT_IN_FP32:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]; x qk_scale = log2 units
    if MASKED:
        visible = (key_pos[None, :] <= row_pos[:, None]) & (key_pos[None, :] < seq_len)
        if SLIDING_WINDOW > 0:
            visible = visible & (key_pos[None, :] > row_pos[:, None] - SLIDING_WINDOW)
        s = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
    else:
        # Every key is visible, so the max is finite; qk_scale > 0 commutes with max, and the scale and the
        # subtraction fuse into one multiply-add per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_IN_FP32:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


# Sizes that change from step to step are not specialized on (== 1, divisible by 16): otherwise each new
# batch composition compiles another variant in the middle of serving.
@triton.jit(do_not_specialize=["num_reqs", "min_q_len", "max_q_len"])
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    kv_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    order_ptr,
    partials_ptr,
    sinks_ptr,
    qk_scale,
    k_scale_ptr,
    v_scale_ptr,
    num_reqs,
    min_q_len,
    max_q_len,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_req,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PARTIAL_ROW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    # Programs are numbered last query tile first: within a request later tiles see more keys, so the
    # longest programs start first and the short ones fill the tail.
    program = tl.num_programs(0) - 1 - tl.program_id(0)
    tile_id = program // NUM_KV_HEADS
    kv_head = program % NUM_KV_HEADS
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)

    if HAS_ORDER:
        # Decode (at most one query token per request): tile i is request order[i], so the requests the
        # caller sorted last (the longest) start first, and no search is needed.
        req = tl.load(order_ptr + tile_id)
        req_valid = req < num_reqs
        q_start = tl.load(query_start_loc_ptr + req, mask=req_valid, other=0)
        q_len = tl.load(query_start_loc_ptr + req + 1, mask=req_valid, other=0) - q_start
        q_tile = 0
    else:
        # Find the request owning this query tile: the last i with first_tile(i) <= tile_id.
        lo = tl.full([], 0, tl.int32)
        hi = lo + num_reqs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if BLOCK_Q == 1:
                first_tile = tl.load(query_start_loc_ptr + mid)
            else:
                first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            if first_tile <= tile_id:
                lo = mid
            else:
                hi = mid - 1
        req = lo
        req_valid = req < num_reqs
        q_start = tl.load(query_start_loc_ptr + req)
        q_len = tl.load(query_start_loc_ptr + req + 1, mask=req_valid, other=0) - q_start
        if BLOCK_Q == 1:
            q_tile = tile_id - q_start
        else:
            q_tile = tile_id - (q_start // BLOCK_Q + req)
    # Past the last request (padding tokens), past this request's queries, or filtered out.
    if (req >= num_reqs) | (q_tile * BLOCK_Q >= q_len) | (q_len < min_q_len) | (q_len > max_q_len):
        return

    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)
    q_in_tile = rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    q_idx = q_tile * BLOCK_Q + q_in_tile  # query index within the request
    row_valid = (head_in_group < GROUP) & (q_in_tile < BLOCK_Q) & (q_idx < q_len)
    row_pos = context_len + q_idx
    tokens = (q_start + q_idx).to(tl.int64)
    heads = kv_head * GROUP + head_in_group
    dim_offsets = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dim_offsets < HEAD_DIM

    q = tl.load(
        q_ptr + tokens[:, None] * stride_q_tok + heads[:, None] * stride_q_head + dim_offsets[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    elif FP8_CACHE and q.dtype == tl.bfloat16:  # e4m3 widens to fp16 in one conversion (to bf16, through fp32)
        q = q.to(tl.float16)

    # Keys this query tile may see: [0, kv_end), or with a window [first_pos - SLIDING_WINDOW + 1, kv_end);
    # its key tiles [tile_start, num_tiles). Those in [unmasked_lo, unmasked_hi) are visible to every row
    # (below the first row's position, inside the last row's window); the others take the masked loop.
    first_pos = context_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    unmasked_hi = (first_pos + 1) // BLOCK_N
    if SLIDING_WINDOW > 0:
        tile_start = tl.maximum(first_pos - SLIDING_WINDOW + 1, 0) // BLOCK_N
        unmasked_lo = tl.cdiv(tl.maximum(kv_end - SLIDING_WINDOW, 0), BLOCK_N)
    else:
        tile_start = 0
        unmasked_lo = 0
    if SPLIT:
        tiles_per_split = tl.cdiv(num_tiles - tile_start, num_splits)
        tile_lo = tile_start + split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    else:
        tile_lo = tile_start
        tile_hi = num_tiles

    if HAS_SINKS:
        # The sink is a key of score `sink` (natural log units) and no value: the running max starts at it
        # with a sum of 1, in one split only.
        has_sink = row_valid & (split + 0 * rows == 0)
        sink = tl.load(sinks_ptr + heads, mask=has_sink, other=float("-inf")).to(tl.float32)
        m_i = sink * 1.4426950408889634
        l_i = tl.where(has_sink, 1.0, 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_table_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt_req
    k_head_ptr = kv_cache_ptr + kv_head * stride_c_head
    v_head_ptr = k_head_ptr + stride_c_kv
    if FP8_CACHE:  # scores of e4m3 keys times k_scale
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    for tile in range(tile_lo, tl.minimum(tile_hi, unmasked_lo)):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, tile, k_head_ptr, v_head_ptr, block_table_row_ptr, row_pos, seq_len, qk_scale,
            stride_c_block, stride_c_slot, dim_offsets,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, SLIDING_WINDOW, DOT_PRECISION, DOT_IN_FP32, FP8_CACHE,
        )  # fmt: skip
    for tile in range(tl.maximum(tile_lo, unmasked_lo), tl.minimum(tile_hi, unmasked_hi)):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, tile, k_head_ptr, v_head_ptr, block_table_row_ptr, row_pos, seq_len, qk_scale,
            stride_c_block, stride_c_slot, dim_offsets,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, False, SLIDING_WINDOW, DOT_PRECISION, DOT_IN_FP32,
            FP8_CACHE,
        )  # fmt: skip
    for tile in range(tl.maximum(tl.maximum(tile_lo, unmasked_lo), unmasked_hi), tile_hi):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, tile, k_head_ptr, v_head_ptr, block_table_row_ptr, row_pos, seq_len, qk_scale,
            stride_c_block, stride_c_slot, dim_offsets,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, SLIDING_WINDOW, DOT_PRECISION, DOT_IN_FP32, FP8_CACHE,
        )  # fmt: skip
    if FP8_CACHE:
        acc = acc * tl.load(v_scale_ptr)

    if SPLIT:
        # Partial results in fp32, one row of PARTIAL_ROW floats per (token, head, split): the
        # unnormalised acc in [0, HEAD_DIM), the running max at HEAD_DIM, the sum at HEAD_DIM + 1.
        # A row that saw no key (nor sink) writes only (max = -inf, sum = 0), which the reduction skips.
        part_rows = ((tokens * (NUM_KV_HEADS * GROUP) + heads) * num_splits + split) * PARTIAL_ROW
        tl.store(partials_ptr + part_rows + HEAD_DIM, m_i, mask=row_valid)
        tl.store(partials_ptr + part_rows + HEAD_DIM + 1, l_i, mask=row_valid)
        rows_with_work = row_valid & (m_i > float("-inf"))
        tl.store(
            partials_ptr + part_rows[:, None] + dim_offsets[None, :],
            acc,
            mask=rows_with_work[:, None] & dim_valid[None, :],
        )
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_offsets = tokens[:, None] * stride_o_tok + heads[:, None] * stride_o_head + dim_offsets[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


@triton.jit(do_not_specialize=["num_reqs"])
def _reduce_splits_kernel(
    out_ptr,
    partials_ptr,
    query_start_loc_ptr,
    num_reqs,
    stride_o_tok,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PARTIAL_ROW: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_reqs):
        return  # padding token: no request wrote its partials
    splits = tl.arange(0, NUM_SPLITS_PAD)
    split_valid = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM_PAD)
    part_rows = ((token * NUM_HEADS + head) * NUM_SPLITS + splits) * PARTIAL_ROW
    m = tl.load(partials_ptr + part_rows + HEAD_DIM, mask=split_valid, other=float("-inf"))
    l = tl.load(partials_ptr + part_rows + HEAD_DIM + 1, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    has_keys = m > float("-inf")
    weight = tl.where(has_keys, tl.exp2(m - m_max), 0.0)
    acc = tl.load(
        partials_ptr + part_rows[:, None] + dims[None, :],
        mask=(split_valid & has_keys)[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    l_total = tl.sum(weight * l, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(l_total == 0.0, 1.0, l_total)
    out_ptrs = out_ptr + token * stride_o_tok + head * stride_o_head + dims
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def dense_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """One request's causal attention over its own new keys ([tokens, heads, head_dim] each, no cached
    prefix) through torch's fused attention, which picks the fastest kernel the GPU has: cuDNN's on an
    H100, 0.27 ms against the paged kernel's 0.38 ms on a 4096-token Llama-3.1-8B prefill
    (benchmarks/kernel_bench.py); about 7 ms of the time to first token."""
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                         value.transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


# Host-side helpers in plain Python: triton.cdiv / triton.next_power_of_2 unwrap constexprs on each
# call, which costs microseconds per call on this per-layer path.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_NUM_SMS


@functools.lru_cache(maxsize=4096)
def _launch_config(
    dtype: torch.dtype, head_dim_pad: int, group_pad: int, max_query_len: int, num_tokens: int, num_kv_heads: int,
    device: torch.device,
) -> dict:
    """Tile sizes and launch settings (measured on an H100, see benchmarks/kernel_bench.py --tune).

    Decode: one token's GQA group per query tile (padded to 16 rows for tl.dot), 128 keys per step for
    16-bit caches (2-3 % faster than 64 at nano-like uneven lengths, 208-256 requests). Prefill: 128
    rows (BLOCK_Q tokens x the group), where the tensor cores bound the time, unless that leaves too few
    programs to fill the GPU (a short chunk), then 64 (MIN_PREFILL_ROWS, also for short queries); 32 keys
    per step, so the causal diagonal wastes little (nano's 28 prompts of a 16k step 23 % faster than with
    128, one 4,096-token prompt the same). Under the interpreter (CPU) the smallest tiles tl.dot takes,
    so that tiny tests walk several query and key tiles.
    """
    if device.type != "cuda":
        block_m = max(16, group_pad)
        return dict(BLOCK_Q=block_m // group_pad if max_query_len > 1 else 1, BLOCK_M=block_m, BLOCK_N=16,
                    num_warps=4, num_stages=1)  # fmt: skip
    if max_query_len == 1:
        block_m = max(16, group_pad)
        block_n = (128 if dtype != torch.float32 else 64) if head_dim_pad <= 128 else 32
        return dict(BLOCK_Q=1, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    big_tiles = head_dim_pad <= 128 and dtype != torch.float32
    if big_tiles and (num_tokens * group_pad // 128) * num_kv_heads >= 2 * num_sms(device):
        rows, block_n, num_warps = 128, 32, 4
    elif head_dim_pad <= 128:
        rows, block_n, num_warps = 64, 64, 4
    else:
        rows, block_n, num_warps = 64, 32, 8
    block_m = max(MIN_PREFILL_ROWS, group_pad, min(rows, _next_power_of_2(max_query_len) * group_pad))
    return dict(BLOCK_Q=block_m // group_pad, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=3)


def decode_num_splits(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor) -> int:
    """Key splits per query token on the decode path: a power of two chosen from tensor shapes only
    (never from sequence lengths, so CUDA graphs stay valid). Enough programs to fill the GPU, at most
    MAX_NUM_SPLITS, and no more than the key tiles the block table can address (rounded up)."""
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    return _decode_num_splits(
        query.dtype, query.device, num_tokens, num_heads, head_dim, num_kv_heads, block_size, block_table.shape[1],
        PROGRAMS_PER_SM,
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _decode_num_splits(
    dtype: torch.dtype, device: torch.device, num_tokens: int, num_heads: int, head_dim: int, num_kv_heads: int,
    block_size: int, table_width: int, programs_per_sm: int,
) -> int:  # fmt: skip
    group_pad = _next_power_of_2(num_heads // num_kv_heads)
    head_dim_pad = max(16, _next_power_of_2(head_dim))
    block_n = _launch_config(dtype, head_dim_pad, group_pad, 1, num_tokens, num_kv_heads, device)["BLOCK_N"]
    target_programs = programs_per_sm * num_sms(device)
    wanted = _next_power_of_2(_cdiv(target_programs, max(1, num_tokens * num_kv_heads)))
    max_tiles = _next_power_of_2(max(1, _cdiv(table_width * block_size, block_n)))
    return min(wanted, max_tiles, MAX_NUM_SPLITS)


@functools.lru_cache(maxsize=4096)
def _prefill_num_splits(num_tokens: int, group_pad: int, block_m: int, block_n: int, num_kv_heads: int,
                        max_seq_len: int, device: torch.device) -> int:
    """Key splits for a prefill-shaped launch: one when its query tiles fill the GPU, else enough to fill
    it (a short chunk over a long cached prefix has few tiles, each walking many keys), keeping at least
    MIN_TILES_PER_SPLIT key tiles per split."""
    programs = _cdiv(num_tokens * group_pad, block_m) * num_kv_heads
    if programs >= num_sms(device):
        return 1
    wanted = _next_power_of_2(_cdiv(num_sms(device), programs))
    # A power of two, like the decode path's counts: the reduction kernels decode compiled serve it too.
    most = 1 << max(0, (_cdiv(max_seq_len, block_n) // MIN_TILES_PER_SPLIT).bit_length() - 1)
    return min(wanted, most, MAX_PREFILL_SPLITS)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_query_len: int,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    min_q_len: int = 0,
    max_q_len: int = 2**31 - 1,
    max_seq_len: int | None = None,
    order: torch.Tensor | None = None,
    k_scale: torch.Tensor | float = 1.0,
    v_scale: torch.Tensor | float = 1.0,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention of query [num_tokens, num_heads, head_dim] over kv_cache
    [2, num_blocks, block_size, num_kv_heads, head_dim]; returns out [num_tokens, num_heads, head_dim].

    Request i's queries are rows query_start_loc[i]:query_start_loc[i+1]; query j of it sits at position
    seq_lens[i] - q_len_i + j and sees keys 0..that position through block_table[i]. Rows past
    query_start_loc[num_reqs] are not written. `max_query_len` (host int, an upper bound on q_len_i) picks
    the tile shape: 1 selects the decode path, whose grid and constexprs depend only on tensor shapes
    (CUDA-graph safe) and which splits keys across `num_splits` programs (default: decode_num_splits).
    A prefill-shaped launch too few query tiles to fill the GPU splits its keys as well (default:
    prefill_num_splits, from the shapes and `max_seq_len`, an upper bound on seq_lens).
    Requests with q_len outside [min_q_len, max_q_len] are skipped (their rows are left as they were).
    `order` (decode only: int32 [num_tokens], a permutation of the requests, which then must each own
    at most one query token, in order) puts request order[i] in query tile i; tiles start last first,
    so sorting the requests by ascending seq_len runs the longest first and the short ones fill the tail.
    An FP8 (e4m3) kv_cache holds key / k_scale and value / v_scale. `sliding_window`: a query sees only the
    last that many keys, itself included; `sinks` [num_heads] (any float dtype): a logit per query head in
    the softmax's denominator.

    Grid: (query tiles x num_kv_heads, num_splits), query tiles = num_tokens // BLOCK_Q + num_reqs, or
    num_tokens when BLOCK_Q == 1; then, when num_splits > 1, (num_tokens, num_heads) for the reduction.
    """
    num_tokens, num_heads, head_dim = query.shape
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, f"kv_cache {tuple(kv_cache.shape)} is not [2, blocks, ...]"
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    assert cache_head_dim == head_dim, f"kv_cache head_dim {cache_head_dim} != query head_dim {head_dim}"
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}"
    assert kv_cache.dtype in (query.dtype, FP8_DTYPE), f"query {query.dtype}, kv_cache {kv_cache.dtype}"
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {query.dtype}"
    assert query.stride(2) == 1 and kv_cache.stride(4) == 1, "head_dim must be contiguous in query and kv_cache"
    num_reqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_reqs + 1,), f"query_start_loc {tuple(query_start_loc.shape)}, {num_reqs} reqs"
    assert block_table.dim() == 2 and block_table.shape[0] == num_reqs, f"block_table {tuple(block_table.shape)}"
    assert block_table.stride(1) == 1, "block_table rows must be contiguous"
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens), ("block_table", block_table)):
        assert t.dtype in (torch.int32, torch.int64), f"{name} dtype {t.dtype}"
        assert t.device == query.device, f"{name} on {t.device}, query on {query.device}"
    assert max_query_len >= 1
    assert sliding_window is None or sliding_window >= 1, f"sliding_window {sliding_window}"
    assert sinks is None or (sinks.shape == (num_heads,) and sinks.device == query.device), "sinks: [num_heads]"
    assert order is None or (max_query_len == 1 and order.shape == (num_tokens,) and order.dtype == torch.int32
                             and order.device == query.device), "order: int32 [num_tokens], decode only"
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(2) == 1, "bad out tensor"
    if num_tokens == 0 or num_reqs == 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = _next_power_of_2(group)
    head_dim_pad = max(16, _next_power_of_2(head_dim))
    cfg = _launch_config(query.dtype, head_dim_pad, group_pad, max_query_len, num_tokens, num_kv_heads, query.device)
    block_q = cfg["BLOCK_Q"]
    num_query_tiles = num_tokens if block_q == 1 else num_tokens // block_q + num_reqs
    if num_splits is None:
        if max_query_len == 1:
            num_splits = decode_num_splits(query, kv_cache, block_table)
        elif min_q_len > 0 or max_q_len < max_query_len:
            num_splits = 1
        else:
            num_splits = _prefill_num_splits(num_tokens, group_pad, cfg["BLOCK_M"], cfg["BLOCK_N"], num_kv_heads,
                                             max_seq_len or block_table.shape[1] * block_size, query.device)
    split = num_splits > 1
    assert not (split and (min_q_len > 0 or max_q_len < max_query_len)), "split-KV does not filter requests"
    # Rows of 16-float multiples keep the partial accumulators 64-byte aligned.
    partial_row = head_dim_pad + 16
    if split:
        partial_shape = (num_tokens, num_heads, num_splits, partial_row)
        partials = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
    else:
        partials = out  # unused
    # Triton's interpreter multiplies bf16 operands of tl.dot as raw uint16 bits; there, upcast the
    # (already bf16-rounded) operands to fp32, which gives the same products as the GPU's bf16 dot.
    dot_in_fp32 = query.dtype == torch.bfloat16 and INTERPRETED
    stride_q_tok, stride_q_head, _ = query.stride()
    stride_o_tok, stride_o_head, _ = out.stride()
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head, _ = kv_cache.stride()
    _paged_attention_kernel[(num_query_tiles * num_kv_heads, num_splits)](
        out,
        query,
        kv_cache,
        block_table,
        seq_lens,
        query_start_loc,
        order if order is not None else query_start_loc,
        partials,
        sinks if sinks is not None else partials,
        scale * LOG2E,
        scale_pointer(k_scale, kv_cache),
        scale_pointer(v_scale, kv_cache),
        num_reqs,
        min_q_len,
        max_q_len,
        stride_q_tok,
        stride_q_head,
        stride_o_tok,
        stride_o_head,
        stride_c_kv,
        stride_c_block,
        stride_c_slot,
        stride_c_head,
        block_table.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_M=cfg["BLOCK_M"],
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=cfg["BLOCK_N"],
        SPLIT=split,
        PARTIAL_ROW=partial_row,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or dot_in_fp32 else "tf32",
        DOT_IN_FP32=dot_in_fp32,
        HAS_ORDER=order is not None,
        FP8_CACHE=kv_cache.dtype == FP8_DTYPE,
        SLIDING_WINDOW=sliding_window or 0,
        HAS_SINKS=sinks is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if split:
        _reduce_splits_kernel[(num_tokens, num_heads)](
            out,
            partials,
            query_start_loc,
            num_reqs,
            stride_o_tok,
            stride_o_head,
            NUM_HEADS=num_heads,
            NUM_SPLITS=num_splits,
            NUM_SPLITS_PAD=_next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            PARTIAL_ROW=partial_row,
            num_warps=4,
        )
    return out


@register_backend
class TritonPagedAttentionBackend(AttentionBackend):
    """Paged attention through the Triton kernels above (GPU; on CPU they run under TRITON_INTERPRET=1).

    Decode-only steps (max_query_len == 1) take the split-KV path, whose launch depends only on tensor
    shapes, so it can be captured in a CUDA graph. Mixed steps launch twice over disjoint rows: the
    decode tile shape for the requests with one new token (first in the step), the prefill tile shape
    for the others. A latent cache (MLA, one plane) goes to triton_mla's kernel, shape-only as well.
    """

    name = "triton"
    supports_cuda_graphs = True

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor | None, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | float = 1.0, v_scale: torch.Tensor | float = 1.0, derived: dict | None = None,
    ) -> None:
        write_kv(key, value, kv_cache, slot_mapping, k_scale, v_scale)

    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
        *, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
        k_scale: torch.Tensor | float = 1.0, v_scale: torch.Tensor | float = 1.0,
        sliding_window: int | None = None, sinks: torch.Tensor | None = None, value_dim: int | None = None,
    ) -> torch.Tensor:
        if kv_cache.shape[0] == 1:
            if sliding_window is not None or sinks is not None:
                raise ValueError("a latent (MLA) cache has no sliding window or attention sinks")
            from tokenmill.attention.triton_mla import mla_attention

            return mla_attention(query, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table,
                                 scale, value_dim)
        if key is not None and sliding_window is None and sinks is None and metadata.num_reqs == 1 \
                and query.dtype in (torch.float16, torch.bfloat16) \
                and metadata.max_seq_len == metadata.num_actual_tokens >= DENSE_PREFILL_MIN_TOKENS:
            return dense_causal_attention(query, key, value, scale)
        args = (query, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table, scale)
        options = dict(k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window, sinks=sinks)
        if metadata.max_query_len == 1:
            return paged_attention(*args, max_query_len=1, order=metadata.decode_order, **options)
        d = metadata.num_decodes
        if d == 0:
            return paged_attention(*args, max_query_len=metadata.max_query_len, max_seq_len=metadata.max_seq_len,
                                   **options)
        # Requests with a single new token would waste most rows of a prefill-sized query tile, so the
        # first d requests (those) get a decode launch over just their rows, keys split as in a decode step.
        out = paged_attention(*args, max_query_len=metadata.max_query_len, min_q_len=2, **options)
        paged_attention(query[:d], kv_cache, metadata.query_start_loc[:d + 1], metadata.seq_lens[:d],
                        metadata.block_table[:d], scale, max_query_len=1, out=out[:d], order=metadata.decode_order,
                        **options)
        return out
