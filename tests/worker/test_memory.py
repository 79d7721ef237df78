"""KV-cache sizing: an explicit byte budget, the CPU default, and the profiling step (run here on the CPU;
on a GPU its peak memory sets the budget)."""

from __future__ import annotations

import torch

from tokenmill.config import CacheConfig
from tokenmill.worker.memory import CPU_KV_CACHE_SHARE, cpu_kv_cache_bytes, determine_num_blocks, profile_run


def test_budgets_in_blocks(cpu_worker):
    per_block = cpu_worker.kv_bytes_per_block()
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4  # layers, k/v, block size, kv heads, head dim, float32
    runner = cpu_worker.runner
    assert determine_num_blocks(runner, CacheConfig(kv_cache_memory_bytes=10 * per_block + 1), 0) == 10
    # the CPU's default: every sequence at full length (64 tokens: 4 blocks each, 256 sequences)
    assert determine_num_blocks(runner, CacheConfig(), 0) == 4 * 256


def test_cpu_budget_by_need_capped_by_available_memory():
    per_block, gib = 1 << 20, 1 << 30
    assert cpu_kv_cache_bytes(per_block, 16, max_num_seqs=4, max_model_len=100, available=64 * gib) == 4 * 7 * per_block
    capped = cpu_kv_cache_bytes(per_block, 16, max_num_seqs=256, max_model_len=8192, available=8 * gib)
    assert capped == int(CPU_KV_CACHE_SHARE * 8 * gib)
    # never less than one sequence of max_model_len
    assert cpu_kv_cache_bytes(per_block, 16, 256, 8192, available=gib) == 512 * per_block


def test_profile_run_uses_a_scratch_cache_and_leaves_the_pool_alone(cpu_worker):
    runner = cpu_worker.runner
    pool = runner.kv_cache.pool.clone()
    bound = [layer.kv_cache for layer in runner.kv_cache.attn_layers]
    for layer in runner.kv_cache.attn_layers:  # profiling runs before the pool exists
        layer.kv_cache = torch.empty(0)
    try:
        profile_run(runner)
        assert all(layer.kv_cache.numel() == 0 for layer in runner.kv_cache.attn_layers)
    finally:
        for layer, cache in zip(runner.kv_cache.attn_layers, bound):
            layer.kv_cache = cache
    assert torch.equal(runner.kv_cache.pool, pool)
