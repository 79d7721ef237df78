"""GPTQ checkpoints on the CPU: a tiny Llama quantized and packed here by GPTQ's own formulas (4-bit symmetric,
4-bit asymmetric with desc_act's permuted groups, 8-bit), run by tokenmill, against HF transformers running the
same weights dequantized in float32."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from tokenmill import LLM, SamplingParams
from tokenmill.layers.quantization.gptq import unpack_gptq

GROUP = 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """uint values -> int32 words along `dim`: value i of a word at bits * i (GPTQ's packing)."""
    per_word = 32 // bits
    v = values.to(torch.int64)
    v = v.reshape(-1, per_word, v.shape[1]).permute(0, 2, 1) if dim == 0 else v.reshape(v.shape[0], -1, per_word)
    words = sum(v[..., i] << (bits * i) for i in range(per_word))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def quantize(weight: torch.Tensor, bits: int, sym: bool, g_idx: torch.Tensor):
    """nn.Linear's [out, in] -> (q [in, out], z [groups, out], fp16 s [groups, out]) by groups of g_idx."""
    w, maxq = weight.t().double(), 2**bits - 1
    groups = int(g_idx.max()) + 1
    scales, zeros = torch.empty(groups, w.shape[1], dtype=torch.float16), torch.empty(groups, w.shape[1])
    for g in range(groups):
        rows = w[g_idx == g]
        low, high = rows.amin(0), rows.amax(0)
        if sym:
            scales[g] = (torch.maximum(low.abs(), high.abs()).clamp_min(1e-8) * 2 / maxq).half()
            zeros[g] = (maxq + 1) // 2
        else:
            scales[g] = ((high - low).clamp_min(1e-8) / maxq).half()
            zeros[g] = (-low / scales[g].double()).round().clamp(0, maxq)
    s, z = scales.double()[g_idx], zeros.double()[g_idx]
    q = (w / s + z).round().clamp(0, maxq)
    return q.to(torch.uint8), zeros.to(torch.uint8), scales


def write_gptq(path: str, reference: str, bits: int, sym: bool, desc_act: bool, tokenizer) -> None:
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                                      eos_token_id=2, initializer_range=0.05)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    state, tensors = model.state_dict(), {}
    orders = {}  # matrices of one input (q/k/v, gate/up) share desc_act's order, as GPTQ gives them
    for name, tensor in list(state.items()):
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if module not in LINEARS:
            tensors[name] = tensor.contiguous()
            continue
        in_features = tensor.shape[1]
        shared_input = name.rsplit(".", 3)[0] + {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(
            module, module)
        if shared_input not in orders:
            orders[shared_input] = (torch.randperm(in_features, generator=generator) if desc_act
                                    else torch.arange(in_features))
        order = orders[shared_input]
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_features) // GROUP).to(torch.int32)
        q, zeros, scales = quantize(tensor, bits, sym, g_idx.long())
        prefix = name.removesuffix(".weight")
        tensors[f"{prefix}.qweight"] = pack(q, bits, 0)
        tensors[f"{prefix}.qzeros"] = pack(zeros - 1, bits, 1)  # the "gptq" format stores z - 1
        tensors[f"{prefix}.scales"] = scales.contiguous()
        tensors[f"{prefix}.g_idx"] = g_idx
        s, z = scales.double()[g_idx.long()], zeros.double()[g_idx.long()]
        state[name] = ((q.double() - z) * s).t().float()
    model.load_state_dict(state)
    model.save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    quantized = {**config.to_dict(), "quantization_config": {
        "quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": desc_act, "sym": sym,
        "checkpoint_format": "gptq"}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(quantized, f)
    tokenizer.save_pretrained(path)


def test_unpack_is_the_inverse_of_gptqs_packing():
    for bits in (4, 8):
        values = torch.randint(0, 2**bits, (64, 48), dtype=torch.uint8)
        assert torch.equal(unpack_gptq(pack(values, bits, 0), bits, 0), values)
        assert torch.equal(unpack_gptq(pack(values, bits, 1), bits, 1), values)


@pytest.mark.parametrize("bits, sym, desc_act", [(4, True, False), (4, False, True), (8, True, False)])
def test_gptq_model_matches_hf_on_the_dequantized_weights(bits, sym, desc_act, tmp_path, smol_tokenizer):
    path, reference = str(tmp_path / "gptq"), str(tmp_path / "reference")
    os.makedirs(path)
    write_gptq(path, reference, bits, sym, desc_act, smol_tokenizer)
    prompts = [list(range(10 + 7 * i, 30 + 9 * i)) for i in range(6)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [torch.log_softmax(hf(torch.tensor([p])).logits[0, -1].double(), -1) for p in prompts]
    llm = LLM(path, max_model_len=256, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True)
    try:
        layer = llm.llm_engine.core.worker.runner.model.model.layers[0].self_attn.qkv_proj
        assert (layer.linear_method.kernel is not None) == (bits == 4)  # 4-bit kept 4-bit; 8-bit dequantized
        if bits == 4:
            assert (layer.input_order is not None) == desc_act
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    differences = [abs(v.logprob - float(reference[k])) for out, reference in zip(outputs, expected)
                   for k, v in out.outputs[0].logprobs[0].items()]
    # the 4-bit kernel's bfloat16 roundings; dequantized 8-bit runs float32
    assert max(differences) < (0.05 if bits == 4 else 1e-4), differences
    assert [o.outputs[0].token_ids[0] for o in outputs] == [int(r.argmax()) for r in expected]


def test_unsupported_gptq_variants_are_refused(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    folder = tmp_path / "gptq3"
    folder.mkdir()
    for name in os.listdir(path):
        if name != "config.json":
            os.symlink(os.path.join(path, name), folder / name)
    config = json.load(open(os.path.join(path, "config.json")))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 3, "group_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPTQ with bits=3"):
        LLM(str(folder), max_model_len=256, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True)
