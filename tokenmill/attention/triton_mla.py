"""Causal attention over MLA's latent cache in Triton: the absorbed path's MQA (layers/mla.py).

Layouts (attention/backend.py's one-plane cache):

    query        [num_tokens, num_heads, latent + rope]     W_UK^T q_nope, then the rotated q_pe
    latent_cache [1, num_blocks, block_size, 1, latent + rope]  per token: the normed latent c, then k_pe
    out          [num_tokens, num_heads, latent]            sum_s p(t, s) c(s), before W_UV

The paged kernel (triton_paged) keeps one head dim for keys and values and loads them as two tiles; here a
key tile is read once and serves both, its latent part as the values, and the score is split into the
latent and the rope dot products, so neither dim is padded to the next power of two of their sum (576 ->
1024 at DeepSeek's sizes). A program owns one query token and BLOCK_H of its heads (all the heads share
the key, so a tile of them is one tl.dot) and walks the token's keys [0, position] in tiles of BLOCK_N
with an online softmax (base 2, fp32). The grid depends only on tensor shapes, so CUDA graphs can replay
it; prefill tokens each walk their own keys, which re-reads a prompt's keys once per query token (fine
for correctness, not a fast prefill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.attention.triton_paged import INTERPRETED, LOG2E, _cdiv, _next_power_of_2


@triton.jit(do_not_specialize=["num_reqs"])
def _mla_attention_kernel(
    out_ptr,
    q_ptr,
    cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    qk_scale,
    num_reqs,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_c_block,
    stride_c_slot,
    stride_bt_req,
    NUM_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    LATENT: tl.constexpr,
    LATENT_PAD: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    token = tl.program_id(0)
    if token >= tl.load(query_start_loc_ptr + num_reqs):
        return  # padding row
    # The request owning this token: the last i with query_start_loc[i] <= token.
    lo = tl.full([], 0, tl.int32)
    hi = lo + num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(query_start_loc_ptr + mid) <= token:
            lo = mid
        else:
            hi = mid - 1
    req = lo
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    position = tl.load(seq_lens_ptr + req) - q_len + (token - q_start)

    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_valid = heads < NUM_HEADS
    latent_dims = tl.arange(0, LATENT_PAD)
    rope_dims = tl.arange(0, ROPE_PAD)
    latent_valid = latent_dims < LATENT
    rope_valid = rope_dims < ROPE
    q_rows = q_ptr + token.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head
    q_latent = tl.load(q_rows + latent_dims[None, :], mask=head_valid[:, None] & latent_valid[None, :], other=0.0)
    q_rope = tl.load(q_rows + LATENT + rope_dims[None, :], mask=head_valid[:, None] & rope_valid[None, :], other=0.0)
    if DOT_IN_FP32:
        q_latent = q_latent.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, LATENT_PAD], dtype=tl.float32)
    block_table_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt_req
    for tile in range(0, tl.cdiv(position + 1, BLOCK_N)):
        # Key 0 is in the first tile, so every row's running max is finite from the first tile on.
        key_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = key_pos <= position
        block_ids = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        rows = cache_ptr + block_ids.to(tl.int64) * stride_c_block + (key_pos % BLOCK_SIZE) * stride_c_slot
        c = tl.load(rows[:, None] + latent_dims[None, :], mask=key_valid[:, None] & latent_valid[None, :], other=0.0)
        k_pe = tl.load(rows[:, None] + LATENT + rope_dims[None, :], mask=key_valid[:, None] & rope_valid[None, :],
                       other=0.0)
        if DOT_IN_FP32:
            c = c.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        qk = tl.dot(q_latent, tl.trans(c), input_precision=DOT_PRECISION)
        qk += tl.dot(q_rope, tl.trans(k_pe), input_precision=DOT_PRECISION)
        s = tl.where(key_valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    out_ptrs = out_ptr + token.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head + latent_dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None] & latent_valid[None, :])


def mla_attention(query: torch.Tensor, latent_cache: torch.Tensor, query_start_loc: torch.Tensor,
                  seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float, latent_dim: int) -> torch.Tensor:
    """Causal MQA of query [num_tokens, num_heads, latent_dim + rope] over latent_cache [1, num_blocks,
    block_size, 1, latent_dim + rope], values the entries' first latent_dim channels; returns [num_tokens,
    num_heads, latent_dim]. Request i's queries are rows query_start_loc[i]:query_start_loc[i+1], query j
    at position seq_lens[i] - q_len_i + j; rows past query_start_loc[num_reqs] are not written.

    Grid: (num_tokens, cdiv(num_heads, BLOCK_H)).
    """
    num_tokens, num_heads, entry_dim = query.shape
    assert latent_cache.dim() == 5 and latent_cache.shape[0] == 1 and latent_cache.shape[3] == 1, \
        f"latent_cache {tuple(latent_cache.shape)} is not [1, blocks, block_size, 1, dim]"
    assert latent_cache.shape[4] == entry_dim, f"latent_cache dim {latent_cache.shape[4]} != query dim {entry_dim}"
    assert 0 < latent_dim < entry_dim, f"latent_dim {latent_dim} must be below the entry dim {entry_dim}"
    assert latent_cache.dtype == query.dtype, f"query {query.dtype}, latent_cache {latent_cache.dtype}"
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {query.dtype}"
    assert query.stride(2) == 1 and latent_cache.stride(4) == 1, "the entry dim must be contiguous"
    num_reqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_reqs + 1,), f"query_start_loc {tuple(query_start_loc.shape)}, {num_reqs} reqs"
    assert block_table.dim() == 2 and block_table.shape[0] == num_reqs and block_table.stride(1) == 1, \
        f"block_table {tuple(block_table.shape)} must be [num_reqs, max_blocks], rows contiguous"
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens), ("block_table", block_table)):
        assert t.dtype in (torch.int32, torch.int64), f"{name} dtype {t.dtype}"
        assert t.device == query.device, f"{name} on {t.device}, query on {query.device}"
    out = query.new_empty(num_tokens, num_heads, latent_dim)
    if num_tokens == 0 or num_reqs == 0:
        return out
    rope_dim = entry_dim - latent_dim
    block_h = 16  # tl.dot's smallest M; heads past num_heads are masked
    dot_in_fp32 = query.dtype == torch.bfloat16 and INTERPRETED  # see triton_paged.paged_attention
    _mla_attention_kernel[(num_tokens, _cdiv(num_heads, block_h))](
        out,
        query,
        latent_cache,
        block_table,
        seq_lens,
        query_start_loc,
        scale * LOG2E,
        num_reqs,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        latent_cache.stride(1),
        latent_cache.stride(2),
        block_table.stride(0),
        NUM_HEADS=num_heads,
        BLOCK_H=block_h,
        LATENT=latent_dim,
        LATENT_PAD=max(16, _next_power_of_2(latent_dim)),
        ROPE=rope_dim,
        ROPE_PAD=max(16, _next_power_of_2(rope_dim)),
        BLOCK_SIZE=latent_cache.shape[2],
        BLOCK_N=16 if query.device.type != "cuda" else 32,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or dot_in_fp32 else "tf32",
        DOT_IN_FP32=dot_in_fp32,
        num_warps=4,
        num_stages=2,
    )
    return out
