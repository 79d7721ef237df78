"""AWQ checkpoints (GEMM layout) on the CPU: a tiny Llama quantized and packed here by AWQ's own formulas, run
4-bit by tokenmill, against HF transformers running the same weights dequantized in float32."""

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
from tokenmill.layers.quantization.awq import AWQ_ORDER, unpack_awq

GROUP = 64


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
    model = tiny_llama()
    tensors = {}
    state = model.state_dict()
    for name, tensor in list(state.items()):
        if linear_module(name) is None:
            tensors[name] = tensor.contiguous()
            continue
        q, zeros, scales = quantize(tensor)
        prefix = name.removesuffix(".weight")
        tensors[f"{prefix}.qweight"] = pack_awq(q)
        tensors[f"{prefix}.qzeros"] = pack_awq(zeros)
        tensors[f"{prefix}.scales"] = scales.contiguous()
        state[name] = dequantize(q, zeros, scales).float()
    save_checkpoints(model, state, tensors, {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                             "zero_point": True, "version": "gemm"}, path, reference, tokenizer)


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory, smol_tokenizer) -> tuple[str, str]:
    """(the AWQ directory, a float32 HF directory of its dequantized weights)."""
    path, reference = str(tmp_path_factory.mktemp("awq")), str(tmp_path_factory.mktemp("awq-reference"))
    write_awq(path, reference, smol_tokenizer)
    return path, reference


def test_awq_model_runs_4bit_and_matches_hf_on_the_dequantized_weights(awq_checkpoint):
    """Greedy next tokens equal HF's, and their top-5 log-probabilities up to the 4-bit kernel's bfloat16
    roundings."""

    def kept_4bit(llm: LLM) -> None:
        layer = first_layer(llm).mlp.gate_up_proj
        assert layer.linear_method.kernel is not None and hasattr(layer, "int4_weight")

    differences = logprob_differences(*awq_checkpoint, kept_4bit)
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
