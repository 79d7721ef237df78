"""Async scheduling (step N+1 scheduled before step N's tokens reach the host) gives exactly the
outputs of synchronous scheduling, through prefix hits, n > 1, stop conditions and preemption."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def run(model_dir, async_scheduling: bool, prompts, params, **kwargs):
    llm = LLM(model_dir, dtype="float32", async_scheduling=async_scheduling,
              **{"kv_cache_memory_bytes": 16 << 20, "max_model_len": 256, **kwargs})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    core = llm.llm_engine.core
    core.scheduler.check_integrity()
    assert core.scheduler.kv.pool.num_free_blocks == core.scheduler.kv.pool.num_blocks
    return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outs], core.stats()


def workload():
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 40000, (n,), generator=generator).tolist() for n in (1, 9, 16, 40, 70, 33)]
    prompts.append(prompts[3][:30] + [5, 6, 7])  # shares a prefix with another prompt
    base = dict(temperature=0, ignore_eos=True)
    params = [SamplingParams(max_tokens=n, **base) for n in (5, 30, 17, 24, 3, 40)]
    params.append(SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))
    return prompts, params


@pytest.mark.parametrize("pressure", [False, True])
def test_async_matches_sync(model_dir, pressure):
    prompts, params = workload()
    kwargs = {}
    if pressure:  # 14 blocks of 16 tokens: one long sequence fits, the batch does not
        per_block = LLM(model_dir, dtype="float32", kv_cache_memory_bytes=1 << 20,
                        max_model_len=256).llm_engine.core.worker.kv_bytes_per_block()
        kwargs = dict(kv_cache_memory_bytes=14 * per_block, max_model_len=200)
    sync, _ = run(model_dir, False, prompts, params, **kwargs)
    async_, stats = run(model_dir, True, prompts, params, **kwargs)
    assert async_ == sync
    if pressure:
        assert stats.num_preemptions > 0


def test_async_falls_back_for_host_side_sampling(model_dir):
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = [SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[7], min_tokens=4)]
    assert run(model_dir, True, prompts, params)[0] == run(model_dir, False, prompts, params)[0]
