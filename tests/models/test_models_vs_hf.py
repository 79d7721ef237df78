"""Greedy tokens identical to HF transformers on the same weights (float32, CPU), under every batching."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams

NUM_NEW = 32
PROMPT_LENGTHS = (1, 3, 7, 16, 17, 33, 50, 95)  # block boundaries +-1, single token, several blocks


def make_prompts(seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(model, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        outputs.append(ids[0, len(prompt):].tolist())
    return outputs


def run(llm: LLM, prompts: list[list[int]], one_at_a_time: bool = False) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    if one_at_a_time:
        return [llm.generate([r], params, use_tqdm=False)[0].outputs[0].token_ids for r in requests]
    return [out.outputs[0].token_ids for out in llm.generate(requests, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v2",
                                  "deepseek_v2_q_lora", "deepseek_v3"])
def test_tiny_models_match_hf_under_every_batching(arch, tiny_model_dir, assert_pool_free):
    path = tiny_model_dir(arch)
    prompts = make_prompts(seed=len(arch))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = hf_greedy(hf_model, prompts, NUM_NEW)

    llm = LLM(path, dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=512)
    assert run(llm, prompts) == expected
    assert run(llm, prompts, one_at_a_time=True) == expected
    assert_pool_free(llm)

    chunked = LLM(path, dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=512,
                  max_num_batched_tokens=8, enable_prefix_caching=False)
    assert run(chunked, prompts) == expected
    assert_pool_free(chunked)

    # 40 blocks of 4 tokens hold one max_model_len sequence but far fewer than all 8 at once.
    block_bytes = chunked.llm_engine.core.worker.kv_bytes_per_block() // 16 * 4
    pressured = LLM(path, dtype="float32", block_size=4, kv_cache_memory_bytes=40 * block_bytes, max_model_len=160,
                    enable_prefix_caching=False)
    assert pressured.llm_engine.core.num_blocks == 40
    assert run(pressured, prompts) == expected
    assert pressured.llm_engine.core.stats().num_preemptions > 0
    assert_pool_free(pressured)


def test_embedded_smollm2_matches_hf(smol_tokenizer, assert_pool_free):
    from tokenmill.source.default_model import default_model_path

    path = default_model_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.rsplit("/", 1)[0]), gguf_file=path.rsplit("/", 1)[1], dtype=torch.float32).eval()
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
             "1, 2, 3, 4,", "Hello", "The three primary colors are red,", "Water boils at",
             "In machine learning, a transformer is"]
    prompts = [smol_tokenizer.encode(t) for t in texts]
    expected = hf_greedy(hf_model, prompts, NUM_NEW)
    llm = LLM(dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 << 20)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for output in outputs:  # incremental detokenization gives the tokenizer's own decoding
        assert output.outputs[0].text == smol_tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)
    assert_pool_free(llm)


def test_logits_rows_only_last_layer_matches_every_row(tiny_model_dir):
    """A prefill step's last layer computes only the rows that get logits (past writing every key); with
    prompt logprobs it computes every row. The sampled tokens' logprobs agree either way."""
    llm = LLM(tiny_model_dir("qwen3"), dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=512)
    requests = [{"prompt_token_ids": p} for p in make_prompts(seed=5)]
    runs = []
    for prompt_logprobs in (None, 1):
        params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=5, prompt_logprobs=prompt_logprobs,
                                ignore_eos=True)
        runs.append([out.outputs[0] for out in llm.generate(requests, params, use_tqdm=False)])
    for pruned, full in zip(*runs):
        assert pruned.token_ids == full.token_ids
        for a, b in zip(pruned.logprobs, full.logprobs):
            assert a.keys() == b.keys()
            torch.testing.assert_close([a[t].logprob for t in a], [b[t].logprob for t in a], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["mistral_window", "qwen2_window"])
def test_sliding_windows_shorter_than_the_prompts_match_hf(arch, tiny_model_dir, assert_pool_free):
    """Mistral's window on every layer, Qwen2's from max_window_layers on; most prompts are longer than it, and
    chunks of 8 tokens cross its edge."""
    path = tiny_model_dir(arch)
    config = json.loads(open(f"{path}/config.json").read())
    assert config["sliding_window"] < 10 and config.get("layer_types", ["sliding_attention"])[-1] == "sliding_attention"
    prompts = make_prompts(seed=len(arch))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = hf_greedy(hf_model, prompts, NUM_NEW)
    llm = LLM(path, dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=512)
    assert run(llm, prompts) == expected
    chunked = LLM(path, dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=512,
                  max_num_batched_tokens=8, enable_prefix_caching=False)
    assert run(chunked, prompts) == expected
    assert_pool_free(chunked)
