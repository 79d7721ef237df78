"""Tensor parallelism on the CPU: gloo, rank 0 in the engine's process and one spawned process per further
rank (the mp executor). Greedy tokens must equal one rank's on the same float32 weights."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.distributed import parallel_state
from tokenmill.executor.multiproc import RankFailed

KWARGS = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=256)
PROMPTS = [list(range(5 + i, 40 + 3 * i)) for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def generate(path: str, tp: int, prompts=PROMPTS, params=GREEDY, **kwargs) -> tuple[list, object]:
    llm = LLM(path, tensor_parallel_size=tp, **{"kv_cache_memory_bytes": 8 << 20, **KWARGS, **kwargs})
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        core = llm.llm_engine.core
        core.scheduler.check_integrity()
        return [o.outputs[0].token_ids for o in outputs], core.stats()
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_tp2_and_tp4_give_tp1s_greedy_tokens(arch, tiny_model_dir):
    """The tiny models have 4 query heads and 2 KV heads: at TP=4 each KV head is held by two ranks. qwen3 ties
    its embeddings and norms q and k per head; gpt_oss splits its sinks by head and adds its experts' down bias on
    rank 0 only; DeepSeek-V3 (MLA) splits its 4 heads and keeps the latent cache whole on every rank."""
    path = tiny_model_dir(arch)
    one, _ = generate(path, 1)
    for tp in (2, 4):
        assert generate(path, tp)[0] == one, f"TP={tp}"
    assert parallel_state.get_tp_size() == 1 and not torch.distributed.is_initialized()  # left cleanly


def test_embedded_model_splits_three_ways_and_refuses_two():
    """SmolLM2-135M has 9 query heads and 3 KV heads: TP=3 gives each rank 3 and 1, TP=2 cannot split them."""
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    texts = {}
    for tp in (1, 3):
        llm = LLM(tensor_parallel_size=tp, kv_cache_memory_bytes=32 << 20, max_model_len=512)
        texts[tp] = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.shutdown()
    assert texts[3] == texts[1] and all(texts[1])
    with pytest.raises(ValueError, match=r"tensor_parallel_size must divide the model's num_attention_heads \(9\)"):
        LLM(tensor_parallel_size=2, kv_cache_memory_bytes=32 << 20, max_model_len=512)


def test_preemption_and_prefix_caching_stay_exact(tiny_model_dir):
    """14 blocks of 16 tokens on every rank (a rank's blocks hold its half of the KV heads): the batch does not
    fit, so requests are preempted and recomputed; two prompts share a prefix."""
    path = tiny_model_dir("llama")
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 40000, (n,), generator=generator).tolist() for n in (9, 16, 40, 70, 33, 50)]
    prompts.append(prompts[2][:32] + [5, 6, 7])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (30, 17, 24, 40, 25, 35, 20)]
    probe = LLM(path, kv_cache_memory_bytes=1 << 20, **KWARGS)
    per_block = probe.llm_engine.core.worker.kv_bytes_per_block()
    del probe
    one, _ = generate(path, 1, prompts, params, kv_cache_memory_bytes=14 * per_block, max_model_len=200)
    two, stats = generate(path, 2, prompts, params, kv_cache_memory_bytes=7 * per_block, max_model_len=200)
    assert two == one
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_a_rank_that_dies_fails_the_engine_with_its_error(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), tensor_parallel_size=2, kv_cache_memory_bytes=8 << 20, **KWARGS)
    try:
        assert llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
        rank1 = llm.llm_engine.core.executor.procs[0]
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.wait(10)
        with pytest.raises(RankFailed, match=r"rank 1's worker exited \(exit code -9\)"):
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), "'uni' runs one rank"),
    (dict(distributed_executor_backend="slurm"), "distributed_executor_backend must be one of"),
    (dict(tensor_parallel_size=3), r"must divide the model's num_attention_heads \(4\), got 3"),
    (dict(tensor_parallel_size=8), r"must divide the model's num_attention_heads \(4\), got 8"),
])
def test_impossible_layouts_are_refused_naming_the_flag(kwargs, message, tiny_model_dir):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model_dir("llama"), kv_cache_memory_bytes=8 << 20, **KWARGS, **kwargs)


def test_ray_backend_without_ray_is_refused_naming_it(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ValueError, match=r"distributed_executor_backend='ray' needs Ray: pip install ray"):
        LLM(tiny_model_dir("llama"), tensor_parallel_size=2, distributed_executor_backend="ray",
            kv_cache_memory_bytes=8 << 20, **KWARGS)
