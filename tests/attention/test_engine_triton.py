"""The whole engine on the Triton backend (CPU: interpreter) gives the torch backend's greedy tokens,
through chunked prefill, prefix hits and mixed prefill/decode steps."""

from __future__ import annotations

import torch
import transformers

from tokenmill import LLM, SamplingParams


def test_triton_backend_matches_torch_backend_in_the_engine(tmp_path):
    config = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=256, initializer_range=0.1)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (1, 7, 17, 33)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(**kwargs):
        llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory_bytes=1 << 24, skip_tokenizer_init=True, **kwargs)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert run(attention_backend="triton", max_num_batched_tokens=16) == run(attention_backend="torch")


def test_triton_latent_attention_matches_torch_backend_in_the_engine(tiny_model_dir):
    """DeepSeek-V3's latent cache through the Triton kernel: chunked prefill, mixed steps, and prompts that share
    a cached prefix (the second pass hits the first pass's blocks)."""
    shared = list(range(100, 120))
    prompts = [{"prompt_token_ids": p} for p in ([7], shared + [5, 6], list(range(300, 313)), shared + [9])]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(**kwargs):
        llm = LLM(tiny_model_dir("deepseek_v3"), dtype="float32", kv_cache_memory_bytes=1 << 22, max_model_len=128,
                  block_size=4, **kwargs)
        runs = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] for _ in range(2)]
        assert runs[0] == runs[1]
        return runs[0], llm.llm_engine.core.stats()

    triton_tokens, stats = run(attention_backend="triton", max_num_batched_tokens=8)
    torch_tokens, _ = run(attention_backend="torch")
    assert triton_tokens == torch_tokens
    assert stats.prefix_cache_hits > 0
