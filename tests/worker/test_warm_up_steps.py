"""The start-up warm-up: which made-up steps it runs, and that running them writes no KV-cache byte."""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams
from tokenmill.worker.warm_up import WARM_UP_PREFIX, warm_up, warm_up_steps


@pytest.mark.parametrize("max_model_len", [64, 1024, 8192])
def test_warm_up_steps_fit_the_limits(max_model_len):
    steps = warm_up_steps(max_num_tokens=512, max_model_len=max_model_len, max_num_reqs=8, block_size=16)
    q_lens_seen = set()
    for q_lens, seq_lens in steps:
        assert sum(q_lens) <= 512 and len(q_lens) <= 8
        assert all(0 < q <= s <= max_model_len for q, s in zip(q_lens, seq_lens))
        q_lens_seen.update(q_lens)
    # every power of two a step can hold, and one fresh prompt as long as a step allows
    longest = min(512, max_model_len)
    assert {q for q in q_lens_seen if q > 1} >= {2 ** k for k in range(1, longest.bit_length()) if 2 ** k <= longest}
    assert steps[-1] == ([longest], [longest])
    if max_model_len > WARM_UP_PREFIX:
        assert ([2], [2 + WARM_UP_PREFIX]) in steps  # a short step over a long cached prefix


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
    runner = llm.llm_engine.core.worker.runner
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (2, 9, 20)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    cache = runner.kv_cache.pool.clone()
    warm_up(runner)
    assert torch.equal(cache.view(torch.uint8), runner.kv_cache.pool.view(torch.uint8))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == before
