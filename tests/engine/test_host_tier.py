"""The host (CPU) tier of the KV cache: blocks evicted from a small device pool come back by copy,
with the outputs of recomputation."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.core.block_pool import hash_full_blocks
from tokenmill.core.host_tier import HostKVTier

PREFIX = list(range(2000, 2100))  # 6 full blocks of 16 + 4 tokens
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3")


def make_llm(model_dir, offload_blocks: int, caching: bool = True) -> LLM:
    probe = LLM(model_dir, dtype="float32", kv_cache_memory_bytes=1 << 20, max_model_len=160)
    per_block = probe.llm_engine.core.worker.kv_bytes_per_block()
    return LLM(model_dir, dtype="float32", max_model_len=160, kv_cache_memory_bytes=12 * per_block,
               enable_prefix_caching=caching, kv_offload_size=offload_blocks * per_block / 2**30)


def generate(llm, prompt):
    return llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0]


def test_evicted_prefix_comes_back_from_the_host_tier(model_dir, assert_pool_free):
    llm = make_llm(model_dir, offload_blocks=64)
    reference = make_llm(model_dir, offload_blocks=0, caching=False)
    first = generate(llm, PREFIX + [1, 2, 3])
    assert first.num_cached_tokens == 0
    for i in range(3):  # 150-token strangers fill the 12-block device pool, evicting the prefix
        generate(llm, list(range(5000 + 200 * i, 5150 + 200 * i)))
    assert llm.llm_engine.core.scheduler.kv.pool.get_cached_block(
        hash_full_blocks(None, PREFIX[:16], 16)[0]) is None  # gone from the device
    second = generate(llm, PREFIX + [4, 5])
    stats = llm.llm_engine.core.stats()
    assert second.num_cached_tokens == 96
    assert stats.prefix_cache_host_hits == 96
    assert second.outputs[0].token_ids == generate(reference, PREFIX + [4, 5]).outputs[0].token_ids
    assert_pool_free(llm)


def test_outputs_with_the_tier_equal_recompute_under_pressure(model_dir):
    prompts = [PREFIX + [i] * (i + 1) for i in range(4)] + [list(range(7000, 7120)), PREFIX[:50] + [9] * 30]
    prompts = prompts + prompts[::-1]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * len(prompts)
    params[-1] = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=8, ignore_eos=True)
    tiered = make_llm(model_dir, offload_blocks=40)
    plain = make_llm(model_dir, offload_blocks=0, caching=False)
    def run(llm):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[c.token_ids for c in o.outputs] for o in outputs]

    assert run(tiered) == run(plain)
    assert tiered.llm_engine.core.stats().prefix_cache_host_hits > 0


def test_host_tier_lru_and_protected_blocks():
    tier = HostKVTier(2)
    a, b, c = (bytes([i]) * 32 for i in range(3))
    assert tier.store(a, set()) == 0 and tier.store(b, set()) == 1
    assert tier.store(a, set()) is None  # already held
    assert tier.lookup(a) == 0  # a is now the most recently used
    assert tier.store(c, set()) == 1 and tier.lookup(b) is None  # b was least recently used
    assert tier.store(b, {0, 1}) is None  # every host block is still needed by a pending copy
    tier.reset()
    assert tier.lookup(a) is None and tier.store(a, set()) == 0


def test_an_allocation_never_offloads_into_the_host_blocks_it_copies_in():
    """A host hit whose own allocation evicts device blocks: with the tier full of exactly the hit blocks,
    the evicted blocks must not be offloaded over them (the copy in would read the new bytes)."""
    from tokenmill.core.kv_cache_manager import KVCacheManager
    from tokenmill.core.request import Request

    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True, num_host_blocks=2)

    def run(request_id: str, tokens: list[int]) -> Request:
        request = Request(request_id, tokens, SamplingParams(max_tokens=1), 1, 0.0)
        hits, host_ids, _ = kv.get_computed_blocks(request)
        assert kv.allocate_slots(request, len(tokens) - 2 * (len(hits) + len(host_ids)), hits, host_ids) is not None
        request.num_computed_tokens = len(tokens)
        return request

    kv.free(run("a", [1, 2, 3, 4]))  # two full blocks, hashed, then evictable
    kv.take_block_copies()
    kv.free(run("b", list(range(10, 18))))  # takes all four device blocks: a's two go to the host tier
    swap_out, _ = kv.take_block_copies()
    assert sorted(host for _, host in swap_out) == [0, 1]
    run("a2", [1, 2, 3, 4, 5])  # a's prefix from the host tier; its three new blocks evict b's
    swap_out, swap_in = kv.take_block_copies()
    assert sorted(host for host, _ in swap_in) == [0, 1]
    assert not {host for _, host in swap_out} & {host for host, _ in swap_in}, (swap_out, swap_in)
