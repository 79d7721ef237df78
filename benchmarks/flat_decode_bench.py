"""Experiment: a flattened decode kernel. Like the work-balanced kernel of 5f93d03 (the step's (request,
kv head, key tile) units cut into equal contiguous shares over a fixed grid), but each program walks its
share in ONE loop over key tiles, carrying (request, head, tile) from one iteration to the next and
flushing a pair's result when its last tile is done, so the software pipeline keeps prefetching across
pair boundaries instead of restarting per pair. Compared with the engine's decode launch.

    python benchmarks/flat_decode_bench.py            (GPU: timings)
    TRITON_INTERPRET=1 python benchmarks/flat_decode_bench.py --check   (CPU: against the float64 reference)
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.attention.triton_paged import (INTERPRETED, LOG2E, _attend_tile, _next_power_of_2,  # noqa: E402
                                              num_sms, paged_attention)


@triton.jit
def _work_split(seq_lens_ptr, num_reqs, program, num_programs, NUM_KV_HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
                REQS_PAD: tl.constexpr):
    """The decode step's work, (request, kv head, key tile) units numbered request-major, then head, then
    tile, and this program's share of it, [start, end): the programs get equal shares (+-1).
    Returns (reqs, seq_lens, tiles per head, first unit of each request, start, end)."""
    reqs = tl.arange(0, REQS_PAD)
    lens = tl.load(seq_lens_ptr + reqs, mask=reqs < num_reqs, other=0)
    tiles = tl.cdiv(lens, BLOCK_N)
    units_end = tl.cumsum(tiles * NUM_KV_HEADS, 0)
    units_start = units_end - tiles * NUM_KV_HEADS
    total = tl.sum(tiles * NUM_KV_HEADS, 0).to(tl.int64)
    start = (program * total // num_programs).to(tl.int32)
    end = ((program + 1) * total // num_programs).to(tl.int32)
    return reqs, lens, tiles, units_start, units_end, start, end, total


@triton.jit
def _owner(unit, total, num_programs):
    """The program whose share holds work unit `unit` (see _work_split)."""
    return (((unit + 1).to(tl.int64) * num_programs + total - 1) // total - 1).to(tl.int32)




@triton.jit
def _pair_of(unit, reqs, tiles, units_start, units_end):
    """(request, kv head, tiles per head, first unit of the pair) of work unit `unit`."""
    req = tl.sum((units_end <= unit).to(tl.int32), 0)
    is_req = reqs == req
    req_tiles = tl.sum(tl.where(is_req, tiles, 0), 0)
    req_start = tl.sum(tl.where(is_req, units_start, 0), 0)
    kv_head = (unit - req_start) // tl.maximum(req_tiles, 1)
    return req, kv_head, req_tiles, req_start + kv_head * req_tiles


@triton.jit(do_not_specialize=["num_reqs"])
def _flat_decode_kernel(
    out_ptr, q_ptr, kv_cache_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr, partials_ptr, qk_scale,
    num_reqs, stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_c_kv, stride_c_block, stride_c_slot,
    stride_c_head, stride_bt_req,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, REQS_PAD: tl.constexpr,
    PARTIAL_ROW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    program = tl.program_id(0)
    num_programs = tl.num_programs(0)
    reqs, lens, tiles, units_start, units_end, start, end, total = _work_split(
        seq_lens_ptr, num_reqs, program, num_programs, NUM_KV_HEADS, BLOCK_N, REQS_PAD)
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    req, kv_head, req_tiles, pair_start = _pair_of(start, reqs, tiles, units_start, units_end)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for unit in range(start, end):
        tile = unit - pair_start
        seq_len = tl.load(seq_lens_ptr + req)
        token = tl.load(query_start_loc_ptr + req).to(tl.int64)
        heads = kv_head * GROUP + rows
        q = tl.load(q_ptr + token * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
                    mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
        row_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + seq_len - 1
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, tile, kv_cache_ptr + kv_head * stride_c_head,
            kv_cache_ptr + kv_head * stride_c_head + stride_c_kv, block_table_ptr + req.to(tl.int64) * stride_bt_req,
            row_pos, seq_len, qk_scale, stride_c_block, stride_c_slot, dims,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        pair_end = pair_start + req_tiles
        if (unit == pair_end - 1) | (unit == end - 1):
            if (pair_start >= start) & (pair_end <= end):
                tl.store(out_ptr + token * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :],
                         (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
            else:
                part_rows = ((program * 2 + (pair_start > start).to(tl.int32)) * GROUP + rows).to(tl.int64) * PARTIAL_ROW
                tl.store(partials_ptr + part_rows + HEAD_DIM, m_i, mask=row_valid)
                tl.store(partials_ptr + part_rows + HEAD_DIM + 1, l_i, mask=row_valid)
                tl.store(partials_ptr + part_rows[:, None] + dims[None, :], acc,
                         mask=row_valid[:, None] & dim_valid[None, :])
        if unit == pair_end - 1:  # the next unit opens a new pair
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
            pair_start = pair_end
            if kv_head == NUM_KV_HEADS - 1:
                req, kv_head, req_tiles, pair_start = _pair_of(pair_end, reqs, tiles, units_start, units_end)
            else:
                kv_head += 1


@triton.jit(do_not_specialize=["num_reqs"])
def _flat_reduce_kernel(
    out_ptr,
    partials_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_reqs,
    num_programs,
    stride_o_tok,
    stride_o_head,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REQS_PAD: tl.constexpr,
    PARTIAL_ROW: tl.constexpr,
):
    """Program p merges the pair whose last piece opens program p's share, if that pair began in an
    earlier program: its pieces are slot 1 (or 0, if the pair opened that share too) of the first owner
    and slot 0 of every later one."""
    program = tl.program_id(0)
    reqs, lens, tiles, units_start, units_end, start, end, total = _work_split(
        seq_lens_ptr, num_reqs, program, num_programs, NUM_KV_HEADS, BLOCK_N, REQS_PAD)
    if start >= end:
        return
    req = tl.sum((units_end <= start).to(tl.int32), 0)
    is_req = reqs == req
    req_tiles = tl.sum(tl.where(is_req, tiles, 0), 0)
    kv_head = (start - tl.sum(tl.where(is_req, units_start, 0), 0)) // req_tiles
    pair_start = tl.sum(tl.where(is_req, units_start, 0), 0) + kv_head * req_tiles
    pair_end = pair_start + req_tiles
    if (pair_start >= start) | (pair_end > end):
        return  # opened here (whole, or merged by a later program), or continued by the next program
    first = _owner(pair_start, total, num_programs)
    first_start = (first.to(tl.int64) * total // num_programs).to(tl.int32)
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for p in range(first, program + 1):
        # Programs with an empty share (more programs than work) wrote nothing: they weigh nothing.
        # (A [BLOCK_M] comparison rather than a scalar one: the interpreter mis-types scalar & tensor masks.)
        p_valid = row_valid & (p * total // num_programs < (p + 1) * total // num_programs + 0 * rows)
        slot = ((p == first) & (pair_start > first_start)).to(tl.int32)
        part_rows = ((p * 2 + slot) * GROUP + rows).to(tl.int64) * PARTIAL_ROW
        m_p = tl.load(partials_ptr + part_rows + HEAD_DIM, mask=p_valid, other=float("-inf"))
        l_p = tl.load(partials_ptr + part_rows + HEAD_DIM + 1, mask=p_valid, other=0.0)
        acc_p = tl.load(partials_ptr + part_rows[:, None] + dims[None, :],
                        mask=p_valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        m_new = tl.maximum(m, m_p)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_p - m_new)
        l = l * alpha + l_p * beta
        acc = acc * alpha[:, None] + acc_p * beta[:, None]
        m = m_new
    token = tl.load(query_start_loc_ptr + req).to(tl.int64)
    heads = kv_head * GROUP + rows
    out = acc / tl.where(row_valid, l, 1.0)[:, None]
    tl.store(out_ptr + token * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (dims[None, :] < HEAD_DIM))



def flat_decode(query, kv_cache, query_start_loc, seq_lens, block_table, scale, *, out=None, num_programs=None,
                block_n=128, num_warps=4, num_stages=2, programs_per_sm=1):
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_reqs = seq_lens.shape[0]
    out = torch.empty_like(query) if out is None else out
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, _next_power_of_2(head_dim))
    if INTERPRETED:
        block_n, num_stages = 16, 1
    num_programs = num_programs or programs_per_sm * num_sms(query.device)
    partial_row = head_dim_pad + 16
    partials = torch.empty((num_programs, 2, group, partial_row), dtype=torch.float32, device=query.device)
    block_m = max(16, _next_power_of_2(group))
    reqs_pad = max(16, _next_power_of_2(num_reqs))
    dot_in_fp32 = query.dtype == torch.bfloat16 and INTERPRETED
    _flat_decode_kernel[(num_programs,)](
        out, query, kv_cache, block_table, seq_lens, query_start_loc, partials, scale * LOG2E, num_reqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), *kv_cache.stride()[:4], block_table.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_M=block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, REQS_PAD=reqs_pad, PARTIAL_ROW=partial_row,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or dot_in_fp32 else "tf32", DOT_IN_FP32=dot_in_fp32,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    _flat_reduce_kernel[(num_programs,)](
        out, partials, seq_lens, query_start_loc, num_reqs, num_programs, out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_M=block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_N=block_n, REQS_PAD=reqs_pad, PARTIAL_ROW=partial_row, num_warps=4,
    )  # fmt: skip
    return out


def check() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "attention"))
    from test_triton_paged import PagedBatch, check as check_out
    for dtype in (torch.float32, torch.bfloat16):
        for group in (1, 4):
            for lens in ([45, 3, 0, 17, 30, 1], [200], [5, 6]):
                for programs in (1, 3, 7, 40, 200):
                    b = PagedBatch(lens, [min(1, n) for n in lens], num_heads=2 * group, num_kv_heads=2, head_dim=32,
                                   block_size=4, dtype=dtype, num_padding_tokens=2, seed=group)
                    out = torch.full_like(b.query, float("nan"))
                    flat_decode(b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table, b.scale, out=out,
                                num_programs=programs)
                    check_out(out, b, dtype)
    print("flat decode matches the float64 reference")


def bench() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_bench import Case, bench_graph
    rng = random.Random(0)
    cases = [Case("b=1 L=640", [640], [1], extra_table_columns=256),
             Case("b=1 L=4096", [4096], [1], extra_table_columns=256)]
    cases += [Case(f"b={b}", [rng.randint(200, 2048) for _ in range(b)], [1] * b, extra_table_columns=256)
              for b in (8, 64, 128, 208, 256)]

    def row(label, fn):
        try:
            times = [bench_graph(lambda c=c: fn(c)) * 1e3 for c in cases]
        except Exception as e:  # out of shared memory or registers
            print(f"{label:20s} failed {type(e).__name__}: {str(e)[:80]}")
            return
        print(f"{label:20s} " + " ".join(f"{t:7.1f}us {c.kv_bytes() / (t * 1e-6) / 1e12:4.2f}" for t, c in zip(times, cases)))

    print(torch.cuda.get_device_name())
    print("us and TB/s per launch: " + ", ".join(c.name for c in cases))
    row("engine (order)", lambda c: paged_attention(c.query, c.kv_cache, c.query_start_loc, c.seq_lens, c.block_table,
                                                    c.scale, 1, out=c.out, order=c.seq_lens.argsort(stable=True).to(torch.int32)))
    for block_n, warps, stages, per_sm in [(128, 4, 2, 1), (128, 4, 3, 1), (64, 4, 2, 2), (64, 4, 3, 2), (64, 4, 2, 3),
                                           (64, 4, 4, 1), (32, 4, 4, 2), (128, 8, 2, 1)]:
        row(f"flat {block_n},{warps},{stages},{per_sm}", lambda c: flat_decode(
            c.query, c.kv_cache, c.query_start_loc, c.seq_lens, c.block_table, c.scale, out=c.out, block_n=block_n,
            num_warps=warps, num_stages=stages, programs_per_sm=per_sm))
    # Does the loop pipeline? Triton's TTGIR of the flat kernel at 128,4,2 (async copies mean it does).
    c = cases[-1]
    flat_decode(c.query, c.kv_cache, c.query_start_loc, c.seq_lens, c.block_table, c.scale, out=c.out)
    try:
        for kernel in _flat_decode_kernel.device_caches[0][0].values():
            ttgir = kernel.asm.get("ttgir", "")
            print("flat kernel ttgir: async_copy", ttgir.count("async_copy"), "| local_alloc",
                  ttgir.count("local_alloc"), "| n_regs", kernel.n_regs, "| shared", kernel.metadata.shared)
    except Exception as e:  # Triton internals differ between versions
        print("no ttgir:", type(e).__name__, e)


if __name__ == "__main__":
    check() if "--check" in sys.argv else bench()
