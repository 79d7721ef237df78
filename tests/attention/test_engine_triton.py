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


def test_warm_up_touches_no_cache_block_and_changes_no_output(tmp_path):
    """The start-up warm-up (run by the engine on a GPU; here called directly, under the interpreter)
    walks every step shape it covers without writing the KV cache, and serving afterwards (from the
    prefix cache the first run left) is unchanged."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=128, initializer_range=0.1)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory_bytes=1 << 22, skip_tokenizer_init=True,
              attention_backend="triton", max_num_batched_tokens=160, max_num_seqs=4, max_model_len=64)
    runner = llm.llm_engine.core.runner
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (2, 9, 20)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    cache = [layer.kv_cache.clone() for layer in runner.attn_layers]
    runner.warm_up()
    assert all(torch.equal(a.view(torch.uint8), layer.kv_cache.view(torch.uint8))
               for a, layer in zip(cache, runner.attn_layers))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == before
