"""On a CUDA GPU: once the engine is ready, serving compiles no Triton kernel. Start-up (the decode
graphs, then worker/warm_up.py) must have run every variant a workload launches; one compiled in
the middle of serving stalls every request for about a second."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from triton.runtime.jit import JITFunction

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_serving_compiles_nothing_after_start_up(arch, tmp_path, monkeypatch):
    # Llama-3.1-8B's and Qwen3-0.6B's attention shapes (GQA 4 and 2, head_dim 128), two layers.
    common = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=4096)
    config = (transformers.LlamaConfig(**common, num_attention_heads=32) if arch == "llama"
              else transformers.Qwen3Config(**common, num_attention_heads=16))
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
              gpu_memory_utilization=0.3, max_model_len=2048)
    compiled = []
    original = JITFunction._do_compile

    def logged(self, *args, **kwargs):
        compiled.append(self._fn_name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", logged)
    # nano's shape, smaller: uneven prompts and outputs, chunked prefill mixed with decode, then the
    # same prompts again (prefix-cache hits: short steps over long cached prefixes).
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 4000) for _ in range(rng.randint(1, 1024))]}
               for _ in range(96)]
    params = [SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 200), ignore_eos=True)
              for _ in prompts]
    for _ in range(2):
        llm.generate(prompts, params, use_tqdm=False)
    assert compiled == []
