"""GPTQ checkpoints on the CPU: a tiny Llama quantized and packed here by GPTQ's own formulas (4-bit symmetric,
4-bit asymmetric with desc_act's permuted groups, 8-bit), run by tokenmill, against HF transformers running the
same weights dequantized in float32."""

from __future__ import annotations

import json
import os

import pytest
import torch
from quantized_llama import (  # this folder's
    first_layer,
    linear_module,
    logprob_differences,
    save_checkpoints,
    tiny_llama,
)

from tokenmill import LLM
from tokenmill.layers.quantization.gptq import unpack_gptq

GROUP = 64


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
    model = tiny_llama()
    generator = torch.Generator().manual_seed(1)
    state, tensors = model.state_dict(), {}
    orders = {}  # matrices of one input (q/k/v, gate/up) share desc_act's order, as GPTQ gives them
    for name, tensor in list(state.items()):
        module = linear_module(name)
        if module is None:
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
    quantization_config = {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": desc_act,
                           "sym": sym, "checkpoint_format": "gptq"}
    save_checkpoints(model, state, tensors, quantization_config, path, reference, tokenizer)


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

    def kept_4bit(llm: LLM) -> None:
        layer = first_layer(llm).self_attn.qkv_proj
        assert (layer.linear_method.kernel is not None) == (bits == 4)  # 4-bit kept 4-bit; 8-bit dequantized
        if bits == 4:
            assert (layer.input_order is not None) == desc_act

    differences = logprob_differences(path, reference, kept_4bit)
    # the 4-bit kernel's bfloat16 roundings; dequantized 8-bit runs float32
    assert max(differences) < (0.05 if bits == 4 else 1e-4), differences


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
