"""Automatic prefix caching: identical outputs with caching on and off, exact hit accounting, and the
block pool's invariants after every step."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams

PREFIX = list(range(1000, 1100))  # 100 tokens: 6 full blocks of 16 and 4 more


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def make_llm(model_dir, caching: bool, **kwargs) -> LLM:
    return LLM(model_dir, dtype="float32", enable_prefix_caching=caching,
               **{"kv_cache_memory_bytes": 16 << 20, "max_model_len": 512, **kwargs})


def run_checked(llm: LLM, prompts, params) -> list:
    """generate() by hand, checking the scheduler and block pool after every step."""
    engine = llm.llm_engine
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, sp)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.core.scheduler.check_integrity()
    pool = engine.core.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    return [finished[str(i)] for i in range(len(prompts))]


def workload():
    generator = torch.Generator().manual_seed(0)
    def suffix(n: int) -> list[int]:
        return torch.randint(3, 40000, (n,), generator=generator).tolist()

    prompts = [PREFIX + suffix(n) for n in (5, 16, 30, 1)] + [PREFIX[:40] + suffix(9), PREFIX[:7], suffix(50)]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sampled = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    return prompts + [PREFIX + suffix(3)], [greedy] * len(prompts) + [sampled]


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.mark.parametrize("pressure", [False, True])
def test_caching_on_and_off_give_identical_outputs(model_dir, pressure):
    prompts, params = workload()
    kwargs = {}
    if pressure:  # 12 blocks of 16: room for one long sequence, so preemption and eviction
        per_block = make_llm(model_dir, False).llm_engine.core.worker.kv_bytes_per_block()
        kwargs = dict(kv_cache_memory_bytes=12 * per_block, max_model_len=160)
    off = run_checked(make_llm(model_dir, False, **kwargs), prompts, params)
    cached_llm = make_llm(model_dir, True, **kwargs)
    on = run_checked(cached_llm, prompts, params)
    assert tokens(on) == tokens(off)
    again = run_checked(cached_llm, prompts, params)  # everything cached from the first run, where it fits
    assert tokens(again) == tokens(off)
    stats = cached_llm.llm_engine.core.stats()
    assert stats.prefix_cache_hits > 0
    if pressure:
        assert stats.num_preemptions > 0


def test_exact_hit_accounting_for_a_shared_prefix(model_dir):
    llm = make_llm(model_dir, True)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [PREFIX + [7, 8, 9], PREFIX + [10, 11], PREFIX + [12]]
    cached = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].num_cached_tokens for p in prompts]
    assert cached == [0, 96, 96]
    metrics = llm.get_metrics()
    assert (metrics["vllm:prefix_cache_queries"], metrics["vllm:prefix_cache_hits"]) == (103 + 102 + 101, 192)
    # all three at once in one step: the first computes the prefix, the other two hit it in the same step
    llm.reset_prefix_cache()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 96, 96]


def test_reset_prefix_cache_forgets_blocks(model_dir):
    llm = make_llm(model_dir, True)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([{"prompt_token_ids": PREFIX}], params, use_tqdm=False)
    assert llm.reset_prefix_cache()
    assert llm.generate([{"prompt_token_ids": PREFIX}], params, use_tqdm=False)[0].num_cached_tokens == 0
