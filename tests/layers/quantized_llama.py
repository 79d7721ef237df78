"""What the weight-format tests share: a tiny random Llama to quantize, and the comparison of an engine's
next-token log-probabilities with HF transformers' on the dequantized weights."""

from __future__ import annotations

import json
import os

import torch
import transformers
from safetensors.torch import save_file

from tokenmill import LLM, SamplingParams

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [list(range(10 + 7 * i, 30 + 9 * i)) for i in range(6)]


def tiny_llama() -> transformers.LlamaForCausalLM:
    """Hidden 128 and intermediate 256 (whole 4-bit groups of 64 and kernel tiles), 2 layers, seeded."""
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                                      eos_token_id=2, initializer_range=0.05)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def linear_module(name: str) -> str | None:
    """The linear layer a state-dict weight belongs to ("q_proj"...), None for the rest."""
    module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
    return module if module in LINEARS else None


def save_checkpoints(model: transformers.LlamaForCausalLM, state: dict, tensors: dict, quantization_config: dict,
                     path: str, reference: str, tokenizer) -> None:
    """The quantized checkpoint (`tensors` and the config naming `quantization_config`) at `path`, and the model
    with `state` (its dequantized weights) as a float32 HF checkpoint at `reference`; both with `tokenizer` if
    one is given (the GPU machine has no embedded model to take it from)."""
    model.load_state_dict(state)
    model.save_pretrained(reference)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**model.config.to_dict(), "quantization_config": quantization_config}, f)
    if tokenizer is not None:
        tokenizer.save_pretrained(reference)
        tokenizer.save_pretrained(path)


def logprob_differences(path: str, reference: str, check=None, prompts=PROMPTS) -> list[float]:
    """|tokenmill - HF| over the next token's top-5 log-probabilities of each prompt; `check(llm)` inspects the
    engine before it generates."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [torch.log_softmax(hf(torch.tensor([p])).logits[0, -1].double(), -1) for p in prompts]
    llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True)
    try:
        if check is not None:
            check(llm)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids[0] for o in outputs] == [int(r.argmax()) for r in expected]
    return [abs(v.logprob - float(r[k])) for o, r in zip(outputs, expected)
            for k, v in o.outputs[0].logprobs[0].items()]


def first_layer(llm: LLM):
    return llm.llm_engine.core.worker.runner.model.model.layers[0]
