"""The worker's KV cache: its size per block, its binding to the attention layers, and block copies to and
from the host tier with exact contents."""

from __future__ import annotations

import os

import torch

from tokenmill.layers.attention import Attention
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.worker.kv_cache import KVCache, runs


def make_cache(num_layers: int = 3) -> KVCache:
    layers = [Attention(4, 2, 8, 8 ** -0.5, RotaryEmbedding(8, 32, 10000.0)) for _ in range(num_layers)]
    return KVCache(layers, block_size=4, dtype=torch.float32, device=torch.device("cpu"))


def test_allocate_binds_each_layer_its_view():
    cache = make_cache()
    assert cache.bytes_per_block() == 3 * 2 * 4 * 2 * 8 * 4
    cache.allocate(5)
    assert cache.pool.shape == (3, 2, 5, 4, 2, 8) and not cache.pool.any()
    for i, layer in enumerate(cache.attn_layers):
        assert layer.kv_cache.data_ptr() == cache.pool[i].data_ptr() and layer.kv_cache.shape == (2, 5, 4, 2, 8)
    with cache.scratch(2):
        assert all(layer.kv_cache.shape == (2, 2, 4, 2, 8) for layer in cache.attn_layers)
    assert all(layer.kv_cache.numel() == 0 for layer in cache.attn_layers)


def test_copy_blocks_round_trip_through_the_host_tier():
    cache = make_cache()
    cache.allocate(6)
    cache.allocate_host_tier(4)
    cache.pool.copy_(torch.randn_like(cache.pool))
    original = cache.pool.clone()
    # device blocks 1, 2, 5 out to host blocks 0, 1, 3 (two runs), then back in to device blocks 0, 3, 4
    cache.copy_blocks([(1, 0), (2, 1), (5, 3)], [])
    assert torch.equal(cache.host_pool[0], original[:, :, 1]) and torch.equal(cache.host_pool[3], original[:, :, 5])
    cache.copy_blocks([], [(0, 0), (1, 3), (3, 4)])
    for device_block, source in ((0, 1), (3, 2), (4, 5)):
        assert torch.equal(cache.pool[:, :, device_block], original[:, :, source])
    assert torch.equal(cache.pool[:, :, 1], original[:, :, 1])  # untouched


def test_runs():
    assert runs((5, 6, 7, 2)) == [(0, 5, 3), (3, 2, 1)]
    assert runs((0, 2, 3, 9)) == [(0, 0, 1), (1, 2, 2), (3, 9, 1)]
    assert runs(()) == []


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_cpu_pool_takes_memory_only_as_it_is_written():
    cache = make_cache()
    before = resident_bytes()
    cache.allocate((2 << 30) // cache.bytes_per_block())  # 2 GiB
    assert resident_bytes() - before < 64 << 20
    block = cache.pool[:, :, 12345]
    assert not block.any()  # reads as zeros
    block.fill_(1.0)
    assert cache.pool[:, :, 12345].eq(1.0).all() and resident_bytes() - before < 64 << 20
