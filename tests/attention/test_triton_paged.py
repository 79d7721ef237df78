"""The Triton paged-attention kernels against a float64 PyTorch reference.

On a machine without CUDA they run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) at tiny sizes; with CUDA they run on the GPU at larger sizes.

Every cache is built to catch wrong indexing: block ids are shuffled with unused blocks between
them, and every slot that no request may read (unused blocks, the tail of a partial last block,
block-table entries past a request's length) holds NaN, as do outputs before a kernel writes them.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tokenmill.attention import triton_paged
from tokenmill.attention.backend import AttentionMetadata, get_backend
from tokenmill.attention.triton_paged import decode_num_splits, paged_attention, write_kv

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128, 256] if ON_GPU else [32]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


class PagedBatch:
    """A batch of requests laid out in a paged cache, with the metadata the kernels take."""

    def __init__(
        self,
        seq_lens: list[int],
        q_lens: list[int],
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        num_padding_tokens: int = 0,
        extra_table_columns: int = 2,
        seed: int = 0,
    ):
        assert all(0 <= q <= s for q, s in zip(q_lens, seq_lens))
        gen = torch.Generator().manual_seed(seed)
        self.seq_lens_list, self.q_lens_list = seq_lens, q_lens
        self.block_size, self.dtype = block_size, dtype
        blocks_needed = [-(-s // block_size) for s in seq_lens]
        width = max(blocks_needed) + extra_table_columns
        # Twice the blocks needed, handed out in shuffled order: gaps of unused blocks between them.
        num_blocks = 2 * sum(blocks_needed) + 2
        order = torch.randperm(num_blocks, generator=gen)
        poison_block = int(order[-1])
        self.block_table = torch.full((len(seq_lens), width), poison_block, dtype=torch.int32)
        kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=torch.float32)
        next_block = 0
        for i, (s, n) in enumerate(zip(seq_lens, blocks_needed)):
            ids = order[next_block : next_block + n]
            next_block += n
            self.block_table[i, :n] = ids.to(torch.int32)
            for b in range(n):
                used = min(block_size, s - b * block_size)
                kv[:, ids[b], :used] = torch.randn((2, used, num_kv_heads, head_dim), generator=gen)
        self.kv_cache = kv.to(dtype)
        num_tokens = sum(q_lens) + num_padding_tokens
        self.query = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(dtype)
        self.query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.scale = head_dim**-0.5

    def to(self, device: str) -> PagedBatch:
        for name in ("block_table", "kv_cache", "query", "query_start_loc", "seq_lens"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def metadata(self) -> AttentionMetadata:
        return AttentionMetadata(
            num_actual_tokens=sum(self.q_lens_list),
            num_reqs=len(self.seq_lens_list),
            max_query_len=max(self.q_lens_list),
            max_seq_len=max(self.seq_lens_list),
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_table=self.block_table,
            slot_mapping=torch.full((self.query.shape[0],), -1, dtype=torch.int64, device=self.query.device),
            query_start_loc_cpu=self.query_start_loc.cpu(),
            seq_lens_cpu=self.seq_lens.cpu(),
            num_decodes=(len(list(itertools.takewhile(lambda n: n == 1, self.q_lens_list)))
                         if max(self.q_lens_list) > 1 else 0),
        )

    def reference(self, sliding_window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """float64 causal attention, one request at a time, keys gathered through the block table; a window
        masks keys more than sliding_window - 1 positions back, sinks join each head's softmax as a column."""
        q_all = self.query.cpu().double()
        kv = self.kv_cache.cpu().double()
        table = self.block_table.cpu()
        num_heads, num_kv_heads = q_all.shape[1], kv.shape[3]
        out = torch.zeros(sum(self.q_lens_list), num_heads, q_all.shape[2], dtype=torch.float64)
        start = 0
        for i, (s, q_len) in enumerate(zip(self.seq_lens_list, self.q_lens_list)):
            positions = torch.arange(s)
            blocks = table[i, positions // self.block_size].long()
            k = kv[0, blocks, positions % self.block_size]  # [s, num_kv_heads, head_dim]
            v = kv[1, blocks, positions % self.block_size]
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
            q = q_all[start : start + q_len]
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.scale
            query_pos = s - q_len + torch.arange(q_len)
            scores = scores.masked_fill(positions[None, :] > query_pos[:, None], float("-inf"))
            if sliding_window is not None:
                scores = scores.masked_fill(positions[None, :] <= query_pos[:, None] - sliding_window, float("-inf"))
            if sinks is not None:
                sink_column = sinks.cpu().double()[:, None, None].expand(num_heads, q_len, 1)
                probs = torch.cat([scores, sink_column], dim=-1).softmax(-1)[..., :-1]
            else:
                probs = scores.softmax(-1)
            out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v)
            start += q_len
        return out


def check(out: torch.Tensor, batch: PagedBatch, dtype: torch.dtype, **reference_options) -> None:
    num_actual = sum(batch.q_lens_list)
    real = out[:num_actual].cpu()
    assert not real.isnan().any(), f"{int(real.isnan().any(-1).any(-1).sum())} real rows left unwritten"
    err = rel_err(real, batch.reference(**reference_options))
    assert err <= TOLERANCE[dtype], f"rel err {err:.2e} > {TOLERANCE[dtype]:.0e}"


def run_attention(batch: PagedBatch, max_query_len: int | None = None, **kwargs) -> torch.Tensor:
    out = torch.full_like(batch.query, float("nan"))
    return paged_attention(
        batch.query,
        batch.kv_cache,
        batch.query_start_loc,
        batch.seq_lens,
        batch.block_table,
        batch.scale,
        max_query_len or max(batch.q_lens_list),
        out=out,
        **kwargs,
    )


def sizes(cpu: dict, gpu: dict) -> dict:
    return gpu if ON_GPU else cpu


# ---------------------------------------------------------------------------------------------- write_kv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS + [96] if ON_GPU else [32, 24])
def test_write_kv_strided_views_and_skipped_slots(dtype: torch.dtype, head_dim: int) -> None:
    num_tokens, num_heads, num_kv_heads, block_size, num_blocks = 13, 4, 2, 4, 9
    gen = torch.Generator().manual_seed(1)
    # key/value as views of a fused qkv projection output: not contiguous in the token dim.
    qkv = torch.randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), generator=gen).to(dtype).to(DEVICE)
    _, key, value = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    key = key.view(num_tokens, num_kv_heads, head_dim)
    value = value.view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int64)
    slots[[2, 7, 12]] = -1
    kv_cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    expected = kv_cache.clone().view(2, num_blocks * block_size, num_kv_heads, head_dim)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[0, s], expected[1, s] = key[t], value[t]

    write_kv(key, value, kv_cache, slots.to(DEVICE))

    assert torch.equal(kv_cache.view_as(expected), expected)


def test_write_kv_then_attend_through_backend() -> None:
    """The backend's two operations together: write a step's keys, then attend over them."""
    dtype, num_heads, num_kv_heads, head_dim, block_size = torch.float32, 4, 2, 32, 4
    batch = PagedBatch([9, 6], [3, 6], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=2).to(DEVICE)  # fmt: skip
    # Take this step's keys out of the cache, poison their slots, and let write_kv put them back.
    table = batch.block_table.cpu().long()
    slots = []
    for i, (s, q) in enumerate(zip(batch.seq_lens_list, batch.q_lens_list)):
        pos = torch.arange(s - q, s)
        slots.append(table[i, pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.cat(slots).to(DEVICE)
    flat = batch.kv_cache.view(2, -1, num_kv_heads, head_dim)
    key, value = flat[0, slot_mapping].clone(), flat[1, slot_mapping].clone()
    flat[:, slot_mapping] = float("nan")

    backend = get_backend("triton")
    backend.write_kv(key, value, batch.kv_cache, slot_mapping)
    out = backend.forward(batch.query, batch.kv_cache, batch.metadata(), batch.scale)

    check(out, batch, dtype)


# ----------------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_with_cached_prefix(dtype: torch.dtype, head_dim: int, group: int) -> None:
    """Varlen causal prefill whose keys include each request's cached prefix; partial last blocks."""
    s = sizes(
        cpu=dict(seq_lens=[21, 7, 40], q_lens=[4, 7, 35], num_kv_heads=1, block_size=4),
        gpu=dict(seq_lens=[300, 77, 1000, 129], q_lens=[200, 77, 333, 1], num_kv_heads=2, block_size=16),
    )
    batch = PagedBatch(s["seq_lens"], s["q_lens"], num_heads=group * s["num_kv_heads"], num_kv_heads=s["num_kv_heads"],
                       head_dim=head_dim, block_size=s["block_size"], dtype=dtype, num_padding_tokens=3,
                       seed=group).to(DEVICE)  # fmt: skip
    check(run_attention(batch), batch, dtype)


@pytest.mark.parametrize("group", [1, 2, 8])
def test_prefill_every_tile_alignment(group: int) -> None:
    """Query tiles starting at every offset within a key tile: the unmasked/masked loop boundary."""
    key_tile = 64 if ON_GPU else 16
    contexts = list(range(key_tile + 2))
    q_lens = [2 + c % 5 for c in contexts]
    dtype = torch.float32
    batch = PagedBatch([c + q for c, q in zip(contexts, q_lens)], q_lens, num_heads=group, num_kv_heads=1,
                       head_dim=32, block_size=4, dtype=dtype, seed=3).to(DEVICE)  # fmt: skip
    check(run_attention(batch), batch, dtype)
    # The same requests as a decode batch: the last key of every request at every offset too.
    decode = PagedBatch([c + 1 for c in contexts], [1] * len(contexts), num_heads=group, num_kv_heads=1,
                        head_dim=32, block_size=4, dtype=dtype, seed=4).to(DEVICE)  # fmt: skip
    check(run_attention(decode, max_query_len=1, num_splits=2), decode, dtype)


@pytest.mark.parametrize("head_dim", [24, 32] if not ON_GPU else [32, 96])
def test_prefill_padded_head_dim(head_dim: int) -> None:
    dtype = torch.float16
    batch = PagedBatch([10, 5], [6, 5], num_heads=2, num_kv_heads=2, head_dim=head_dim, block_size=4, dtype=dtype,
                       seed=head_dim).to(DEVICE)  # fmt: skip
    check(run_attention(batch), batch, dtype)


# ------------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_split_kv(dtype: torch.dtype, head_dim: int, group: int) -> None:
    """Pure decode batches take the split-KV path; short requests leave most splits with no keys."""
    s = sizes(
        cpu=dict(seq_lens=[70, 1, 9, 33], num_kv_heads=1, block_size=4, extra=4),
        gpu=dict(seq_lens=[1000, 1, 17, 4000, 64, 513], num_kv_heads=2, block_size=16, extra=30),
    )
    num_reqs = len(s["seq_lens"])
    batch = PagedBatch(s["seq_lens"], [1] * num_reqs, num_heads=group * s["num_kv_heads"],
                       num_kv_heads=s["num_kv_heads"], head_dim=head_dim, block_size=s["block_size"], dtype=dtype,
                       num_padding_tokens=2, extra_table_columns=s["extra"], seed=group).to(DEVICE)  # fmt: skip
    num_splits = decode_num_splits(batch.query, batch.kv_cache, batch.block_table)
    # Several splits, and more of them than the shortest requests have key tiles.
    assert num_splits >= 4, num_splits
    check(run_attention(batch, max_query_len=1), batch, dtype)


def test_decode_split_counts_agree() -> None:
    """The same decode batch with 1, 2, 8 and many splits (most of which have no work)."""
    dtype = torch.float32
    batch = PagedBatch([45, 3, 17], [1, 1, 1], num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, dtype=dtype,
                       seed=5).to(DEVICE)  # fmt: skip
    for num_splits in (1, 2, 8, 64 if ON_GPU else 16):
        check(run_attention(batch, max_query_len=1, num_splits=num_splits), batch, dtype)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_order_permutes_tiles_not_results(num_splits: int) -> None:
    """A decode launch with `order` (request order[i] in tile i, padding tokens included) gives every
    request its own result whatever the permutation; a wrong mapping would mix up rows."""
    dtype = torch.float32
    batch = PagedBatch([45, 3, 17, 30, 0], [1, 1, 1, 1, 0], num_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                       dtype=dtype, num_padding_tokens=2, seed=12).to(DEVICE)  # fmt: skip
    num_tokens = batch.query.shape[0]
    gen = torch.Generator().manual_seed(0)
    by_length = torch.tensor(batch.seq_lens_list).argsort(stable=True).tolist() + list(range(5, num_tokens))
    for order in (list(range(num_tokens)), by_length, torch.randperm(num_tokens, generator=gen).tolist()):
        order = torch.tensor(order, dtype=torch.int32, device=DEVICE)
        check(run_attention(batch, max_query_len=1, num_splits=num_splits, order=order), batch, dtype)
    if num_splits == 1:  # the tiles follow `order`: leave request 2 out (an index past the requests), its row stays
        skip = torch.arange(num_tokens, dtype=torch.int32, device=DEVICE)
        skip[2] = num_tokens
        out = run_attention(batch, max_query_len=1, order=skip, num_splits=1)
        assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()


def test_decode_split_count_depends_on_shapes_only() -> None:
    def num_splits(num_tokens: int, table_width: int) -> int:
        query = torch.empty((num_tokens, 32, 128), device=DEVICE)
        kv_cache = torch.empty((2, 1, 16, 8, 128), device=DEVICE)
        return decode_num_splits(query, kv_cache, torch.empty((num_tokens, table_width), device=DEVICE))

    # Few requests, wide block table: many splits; many requests: one.
    assert num_splits(1, 256) > 1
    assert num_splits(4096, 256) == 1
    # Never more splits than the block table can hold key tiles.
    assert num_splits(1, 1) == 1


# ------------------------------------------------------------------------------------------------- mixed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("decodes_apart", [True, False])
def test_mixed_batch_through_backend(dtype: torch.dtype, group: int, decodes_apart: bool) -> None:
    """Decodes, then prefills with cached prefixes, in one step, through AttentionBackend.forward: the
    one-token requests in a launch of their own, or in the prefill-shaped launch with the rest."""
    s = sizes(
        cpu=dict(seq_lens=[30, 9, 13, 6], q_lens=[1, 1, 5, 6], num_kv_heads=1, head_dim=32, block_size=4),
        gpu=dict(seq_lens=[1500, 2000, 700, 64, 33], q_lens=[1, 1, 150, 64, 20], num_kv_heads=8, head_dim=128,
                 block_size=16),
    )  # fmt: skip
    batch = PagedBatch(s["seq_lens"], s["q_lens"], num_heads=group * s["num_kv_heads"], num_kv_heads=s["num_kv_heads"],
                       head_dim=s["head_dim"], block_size=s["block_size"], dtype=dtype, num_padding_tokens=1,
                       seed=10 + group).to(DEVICE)  # fmt: skip
    metadata = batch.metadata()
    assert metadata.num_decodes == 2
    metadata.num_decodes = 2 if decodes_apart else 0
    out = get_backend("triton").forward(batch.query, batch.kv_cache, metadata, batch.scale)
    check(out, batch, dtype)


def test_short_chunk_over_long_prefix_splits_keys() -> None:
    """A prefix-cache hit: a few new tokens over a long cached prefix leave most of the GPU idle, so the
    prefill launch splits the keys; the result does not depend on the split count."""
    dtype = torch.float32
    s = sizes(cpu=dict(seq_lens=[300], q_lens=[5], block_size=4),
              gpu=dict(seq_lens=[4100], q_lens=[100], block_size=16))
    batch = PagedBatch(s["seq_lens"], s["q_lens"], num_heads=4, num_kv_heads=2, head_dim=32,
                       block_size=s["block_size"], dtype=dtype, seed=6).to(DEVICE)  # fmt: skip
    cfg = triton_paged._launch_config(dtype, 32, 2, max(s["q_lens"]), sum(s["q_lens"]), 2, batch.query.device)
    assert triton_paged._prefill_num_splits(sum(s["q_lens"]), 2, cfg["BLOCK_M"], cfg["BLOCK_N"], 2, s["seq_lens"][0],
                                            batch.query.device) > 1  # fmt: skip
    check(run_attention(batch), batch, dtype)
    for num_splits in (1, 3):
        check(run_attention(batch, num_splits=num_splits), batch, dtype)


def test_zero_length_padding_requests() -> None:
    """The padded layout of a captured step: trailing requests with no queries and tokens that belong to
    no request; real rows are right and nothing else is read (the pads' block-table rows hold poison)."""
    dtype = torch.float32
    batch = PagedBatch([40, 9, 0, 0], [12, 1, 0, 0], num_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                       dtype=dtype, num_padding_tokens=7, seed=8).to(DEVICE)  # fmt: skip
    for max_query_len in (16, 64):  # the captured step's padded token count picks the tiles
        check(run_attention(batch, max_query_len=max_query_len), batch, dtype)
    decode = PagedBatch([33, 5, 0], [1, 1, 0], num_heads=4, num_kv_heads=2, head_dim=32, block_size=4, dtype=dtype,
                        num_padding_tokens=3, seed=9).to(DEVICE)  # fmt: skip
    check(run_attention(decode, max_query_len=1), decode, dtype)


def test_long_fresh_prompt_attends_densely_through_backend(monkeypatch) -> None:
    """One request with no cached prefix and at least DENSE_PREFILL_MIN_TOKENS tokens: the backend attends
    over the step's own keys (passed alongside the cache); the result is the paged one."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    n = triton_paged.DENSE_PREFILL_MIN_TOKENS + 5
    batch = PagedBatch([n], [n], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=dtype,
                       seed=11).to(DEVICE)  # fmt: skip
    positions = torch.arange(n, device=DEVICE)
    blocks = batch.block_table[0, positions // 16].long()
    key, value = batch.kv_cache[0, blocks, positions % 16], batch.kv_cache[1, blocks, positions % 16]
    calls = []
    dense = triton_paged.dense_causal_attention
    monkeypatch.setattr(triton_paged, "dense_causal_attention", lambda *a: calls.append(1) or dense(*a))
    out = get_backend("triton").forward(batch.query, batch.kv_cache, batch.metadata(), batch.scale, key=key,
                                        value=value)  # fmt: skip
    assert calls == [1]
    check(out, batch, dtype)


def test_decode_only_through_backend() -> None:
    dtype = torch.float16
    batch = PagedBatch([25, 8, 2], [1, 1, 1], num_heads=8, num_kv_heads=2, head_dim=32, block_size=4, dtype=dtype,
                       num_padding_tokens=1, seed=7).to(DEVICE)  # fmt: skip
    out = get_backend("triton").forward(batch.query, batch.kv_cache, batch.metadata(), batch.scale)
    check(out, batch, dtype)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay_with_new_seq_lens() -> None:
    """Capture the decode path once, then replay it after changing seq_lens and block tables in place."""
    dtype = torch.bfloat16
    kw = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype, extra_table_columns=64)
    first = PagedBatch([100, 900, 5, 2000], [1] * 4, seed=1, **kw).to(DEVICE)
    # The second batch's cache must fit in the first one's buffer: same shapes throughout.
    second = PagedBatch([1500, 3, 700, 64], [1] * 4, seed=2, **kw).to(DEVICE)
    width = max(first.block_table.shape[1], second.block_table.shape[1])
    blocks = max(first.kv_cache.shape[1], second.kv_cache.shape[1])
    for b in (first, second):
        b.block_table = torch.nn.functional.pad(b.block_table, (0, width - b.block_table.shape[1]))
        b.kv_cache = torch.nn.functional.pad(b.kv_cache, (0, 0, 0, 0, 0, 0, 0, blocks - b.kv_cache.shape[1]))
    static = {name: getattr(first, name).clone() for name in ("query", "kv_cache", "block_table", "seq_lens",
                                                              "query_start_loc")}  # fmt: skip
    out = torch.full_like(static["query"], float("nan"))

    def step() -> None:
        paged_attention(static["query"], static["kv_cache"], static["query_start_loc"], static["seq_lens"],
                        static["block_table"], first.scale, 1, out=out)  # fmt: skip

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for batch in (first, second):
        for name, tensor in static.items():
            tensor.copy_(getattr(batch, name))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, batch, dtype)


# ---------------------------------------------------------------------------------------------- FP8 cache


def test_write_kv_to_an_fp8_cache_stores_values_over_their_scales() -> None:
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = 9, 2, 32, 4, 5
    gen = torch.Generator().manual_seed(3)
    key = (torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen) * 3).to(DEVICE)
    value = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int64)
    slots[4] = -1
    cache = torch.zeros((2, num_blocks, block_size, num_kv_heads, head_dim), dtype=torch.float8_e4m3fn, device=DEVICE)
    write_kv(key, value, cache, slots.to(DEVICE), k_scale=0.02, v_scale=0.005)
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:  # what torch's own conversion (round to nearest even, saturating) gives
            for stored, original, scale in ((flat[0, s], key[t], 0.02), (flat[1, s], value[t], 0.005)):
                expected = (original / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                assert torch.equal(stored.float(), expected.float())


@pytest.mark.parametrize("q_lens, num_splits", [([1, 1, 1], 1), ([1, 1, 1], 2), ([5, 1, 12], None)])
def test_attention_over_an_fp8_cache(q_lens: list[int], num_splits: int | None) -> None:
    """Decode (split or not) and prefill read e4m3 keys and values times their scales: the float64 reference
    attends over the same cache dequantized."""
    k_scale, v_scale = 0.01, 0.004
    batch = PagedBatch([23, 9, 30], q_lens, num_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                       dtype=torch.float32, seed=5)
    scaled = torch.stack([batch.kv_cache[0] / k_scale, batch.kv_cache[1] / v_scale])
    fp8 = scaled.clamp(-448, 448).to(torch.float8_e4m3fn)  # as write_kv stores (torch's cast may not saturate)
    batch.kv_cache = torch.stack([fp8[0].float() * k_scale, fp8[1].float() * v_scale])  # what the reference reads
    batch.to(DEVICE)
    out = torch.full_like(batch.query, float("nan"))
    paged_attention(batch.query, fp8.to(DEVICE), batch.query_start_loc, batch.seq_lens, batch.block_table,
                    batch.scale, max(q_lens), out=out, k_scale=k_scale, v_scale=v_scale, num_splits=num_splits)
    check(out, batch, torch.float32)


# ------------------------------------------------------------------------------------ sliding window, sinks


def random_sinks(num_heads: int, seed: int) -> torch.Tensor:
    """Logits of the size of the scores (about 0 to 4): the sink takes a real share of each softmax."""
    return (torch.randn(num_heads, generator=torch.Generator().manual_seed(seed)) * 2 + 1).to(DEVICE)


WINDOW_CASES = [(5, False), (16, False), (7, True), (None, True)]  # (window, sinks): a few keys, a key tile


@pytest.mark.parametrize("window, with_sinks", WINDOW_CASES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_prefill_and_mixed_steps_with_a_window_and_sinks(backend: str, window: int | None, with_sinks: bool) -> None:
    """Decodes and chunks over cached prefixes longer than the window (chunks crossing it, and shorter than
    it), through the backend: the window's edge falls at every offset within a key tile across the rows."""
    s = sizes(cpu=dict(seq_lens=[40, 3, 30, 9, 45], q_lens=[1, 1, 12, 9, 20], block_size=4),
              gpu=dict(seq_lens=[1500, 3, 700, 64, 333], q_lens=[1, 1, 150, 64, 200], block_size=16))
    dtype = torch.float32
    batch = PagedBatch(s["seq_lens"], s["q_lens"], num_heads=8, num_kv_heads=2, head_dim=32,
                       block_size=s["block_size"], dtype=dtype, num_padding_tokens=2, seed=20).to(DEVICE)
    if backend == "torch":  # it pads the one-token requests' keys to the longest and masks them: 0 x NaN is NaN
        batch.kv_cache = batch.kv_cache.nan_to_num(nan=1e4)
    sinks = random_sinks(8, seed=1) if with_sinks else None
    for num_decodes in (0, 2):  # the one-token requests with the others, or in a launch of their own
        metadata = batch.metadata()
        metadata.num_decodes = num_decodes
        out = get_backend(backend).forward(batch.query, batch.kv_cache, metadata, batch.scale,
                                           sliding_window=window, sinks=sinks)
        check(out, batch, dtype, sliding_window=window, sinks=sinks)


@pytest.mark.parametrize("window, with_sinks", WINDOW_CASES)
@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_paged_decode_with_a_window_and_sinks(num_splits: int, window: int | None, with_sinks: bool) -> None:
    """Split-KV decode: splits wholly before the window get no keys, the sink is counted once."""
    batch = PagedBatch([70, 1, 9, 33, 16, 17], [1] * 6, num_heads=4, num_kv_heads=1, head_dim=32, block_size=4,
                       dtype=torch.float32, num_padding_tokens=1, seed=21).to(DEVICE)  # fmt: skip
    sinks = random_sinks(4, seed=2) if with_sinks else None
    out = run_attention(batch, max_query_len=1, num_splits=num_splits, sliding_window=window, sinks=sinks)
    check(out, batch, torch.float32, sliding_window=window, sinks=sinks)
    batch.kv_cache = batch.kv_cache.nan_to_num(nan=1e4)  # see test_prefill_and_mixed_steps_with_a_window_and_sinks
    torch_out = get_backend("torch").forward(batch.query, batch.kv_cache, batch.metadata(), batch.scale,
                                             sliding_window=window, sinks=sinks)
    check(torch_out, batch, torch.float32, sliding_window=window, sinks=sinks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_and_sinks_in_half_precision(dtype: torch.dtype) -> None:
    batch = PagedBatch([40, 1, 21], [1, 1, 17], num_heads=4, num_kv_heads=2, head_dim=32, block_size=4, dtype=dtype,
                       seed=22).to(DEVICE)  # fmt: skip
    sinks = random_sinks(4, seed=3).to(dtype)
    out = get_backend("triton").forward(batch.query, batch.kv_cache, batch.metadata(), batch.scale,
                                        sliding_window=6, sinks=sinks)
    check(out, batch, dtype, sliding_window=6, sinks=sinks)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_key_tiles_before_the_window_are_not_read(num_splits: int) -> None:
    """Keys in whole key tiles before a query's window hold NaN: a kernel that read them would return NaN."""
    window = 5
    batch = PagedBatch([300, 170, 70], [1, 1, 1], num_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                       dtype=torch.float32, seed=23)  # fmt: skip
    block_n = triton_paged._launch_config(torch.float32, 32, 2, 1, 3, 2, torch.device(DEVICE))["BLOCK_N"]
    reference = batch.reference(sliding_window=window)
    for i, s in enumerate(batch.seq_lens_list):
        unread = torch.arange((s - window) // block_n * block_n)
        assert len(unread) >= block_n
        batch.kv_cache[:, batch.block_table[i, unread // 4].long(), unread % 4] = float("nan")
    out = run_attention(batch.to(DEVICE), max_query_len=1, num_splits=num_splits, sliding_window=window)
    assert rel_err(out.cpu(), reference) <= TOLERANCE[torch.float32]
