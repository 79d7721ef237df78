"""AWQ checkpoints (GEMM layout) on the CPU: a tiny Llama quantized and packed here by AWQ's own formulas, run
4-bit by tokenmill, against HF transformers running the same weights dequantized in float32."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from tokenmill import LLM, SamplingParams
from tokenmill.layers.quantization.awq import AWQ_ORDER, unpack_awq

GROUP = 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[R, C] of 0..15 -> int32 [R, C / 8]: word j holds columns 8j..8j+7, nibble i column 8j + AWQ_ORDER[i]."""
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows, cols // 8, 8)
    words = sum(grouped[..., AWQ_ORDER[i]] << (4 * i) for i in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.Linear's [out, in] -> AWQ's (q [in, out], zeros [in / GROUP, out], fp16 scales [in / GROUP, out]):
    asymmetric min-max per group of GROUP inputs."""
    w = weight.t().double().reshape(-1, GROUP, weight.shape[0])  # [groups, GROUP, out]
    low, high = w.amin(dim=1), w.amax(dim=1)
    scales = ((high - low).clamp_min(1e-8) / 15).half()
    zeros = (-low / scales.double()).round().clamp(0, 15)
    q = (w / scales.double()[:, None] + zeros[:, None]).round().clamp(0, 15)
    return q.reshape(weight.shape[1], -1).to(torch.uint8), zeros.to(torch.uint8), scales


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AWQ's (q, zeros, scales) -> nn.Linear's [out, in] in float64."""
    z = zeros.double().repeat_interleave(GROUP, 0)
    s = scales.double().repeat_interleave(GROUP, 0)
    return ((q.double() - z) * s).t()


def test_unpack_is_the_inverse_of_awqs_packing():
    values = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    assert torch.equal(unpack_awq(pack_awq(values)), values)
    # a word's nibbles, lowest first, are columns 0 2 4 6 1 3 5 7
    word = pack_awq(torch.arange(8, dtype=torch.uint8)[None])
    assert [(int(word) >> (4 * i)) & 15 for i in range(8)] == list(AWQ_ORDER)


def write_awq(path: str, reference: str, tokenizer) -> None:
    """A tiny Llama in AWQ's layout at `path`, and its dequantized weights as a float32 HF model at `reference`."""
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                                      eos_token_id=2, initializer_range=0.05)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    tensors = {}
    state = model.state_dict()
    for name, tensor in list(state.items()):
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if module not in LINEARS:
            tensors[name] = tensor.contiguous()
            continue
        q, zeros, scales = quantize(tensor)
        prefix = name.removesuffix(".weight")
        tensors[f"{prefix}.qweight"] = pack_awq(q)
        tensors[f"{prefix}.qzeros"] = pack_awq(zeros)
        tensors[f"{prefix}.scales"] = scales.contiguous()
        state[name] = dequantize(q, zeros, scales).float()
    model.load_state_dict(state)
    model.save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    quantized = {**config.to_dict(), "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                                             "zero_point": True, "version": "gemm"}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(quantized, f)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory, smol_tokenizer) -> tuple[str, str]:
    """(the AWQ directory, a float32 HF directory of its dequantized weights)."""
    path, reference = str(tmp_path_factory.mktemp("awq")), str(tmp_path_factory.mktemp("awq-reference"))
    write_awq(path, reference, smol_tokenizer)
    return path, reference


def test_awq_model_runs_4bit_and_matches_hf_on_the_dequantized_weights(awq_checkpoint):
    """Greedy continuations agree (their first tokens exactly), and the next token's top-5 log-probabilities
    equal HF's up to the 4-bit kernel's bfloat16 roundings."""
    path, reference = awq_checkpoint
    prompts = [list(range(10 + 7 * i, 30 + 9 * i)) for i in range(6)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    expected, expected_logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=12, do_sample=False)
            expected.append(ids[0, len(prompt):].tolist())
            expected_logprobs.append(torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].double(), -1))
    llm = LLM(path, max_model_len=256, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True)
    try:
        layer = llm.llm_engine.core.worker.runner.model.model.layers[0].mlp.gate_up_proj
        assert layer.linear_method.kernel is not None and hasattr(layer, "int4_weight")  # kept 4-bit
        requests = [{"prompt_token_ids": p} for p in prompts]
        greedy = llm.generate(requests, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        first = llm.generate(requests, SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    got = [o.outputs[0].token_ids for o in greedy]
    agreement = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e)) / (len(prompts) * 12)
    assert [g[:4] for g in got] == [e[:4] for e in expected] and agreement >= 0.75, (got, expected)
    differences = [abs(v.logprob - float(reference[k])) for out, reference in zip(first, expected_logprobs)
                   for k, v in out.outputs[0].logprobs[0].items()]
    assert max(differences) < 0.05, differences


def test_unsupported_awq_variants_are_refused(awq_checkpoint, tmp_path):
    path, _ = awq_checkpoint
    for change, message in [({"version": "gemv"}, "version='gemv'"), ({"bits": 3}, "bits=3")]:
        folder = tmp_path / next(iter(change))
        folder.mkdir()
        for name in os.listdir(path):
            os.symlink(os.path.join(path, name), folder / name)
        config = json.load(open(os.path.join(path, "config.json")))
        config["quantization_config"].update(change)
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            LLM(str(folder), max_model_len=256, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True)
