"""GGUF weights kept quantized (layers/quantization/gguf.py): each type's unpacking against the file's
dequantization (gguf_file.dequantize, the `gguf` package's for the 5- and 6-bit types), the packed 4-bit product
against float64, models of every kept type against the same file dequantized, and the embedded model quantized
against float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.layers.quantization.gguf import GGUFBlocks, unpack_codes  # noqa: E402
from tokenmill.layers.quantization.int4_cpu import int4_linear, pack_int4  # noqa: E402
from tokenmill.source.gguf_file import GGML_TYPES, dequantize  # noqa: E402

INT4_TYPES = ["Q4_0", "Q4_1", "Q4_K"]
KEPT_TYPES = INT4_TYPES + ["Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
HALVES_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
             "Q8_0": [0]}  # the byte offsets of each block's fp16 scales (d, and m or dmin)


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """Random quantized bytes [rows, bytes per row] whose fp16 scales (d, and m or dmin) are finite, in
    (-scale, scale)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    generator = np.random.default_rng(seed)
    raw = generator.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    for offset in HALVES_AT[type_name]:
        half = generator.uniform(-scale, scale, size=(raw.shape[0], 1)).astype(np.float16)
        raw[:, offset:offset + 2] = half.view(np.uint8)
    if type_name == "Q6_K":  # int8 sub-block scales within the 6-bit ones of the other K-quants
        raw[:, 192:208] = generator.integers(-32, 32, size=(raw.shape[0], 16), dtype=np.int8).view(np.uint8)
    return raw.reshape(rows, -1)


def blocks_of(type_name: str, raw: np.ndarray, cols: int) -> GGUFBlocks:
    return GGUFBlocks(GGML_TYPES[type_name], torch.from_numpy(raw.copy()), cols)


@pytest.mark.parametrize("type_name", KEPT_TYPES)
def test_unpacked_codes_are_the_formats_dequantization(type_name):
    rows, cols = 8, 512
    raw = random_blocks(type_name, rows, cols)
    blocks = blocks_of(type_name, raw, cols)
    q, scale, zero = unpack_codes(blocks)
    group = 16 if type_name == "Q6_K" else 32
    assert q.dtype == torch.int8 and scale.shape == zero.shape == (rows, cols // group)
    if type_name in INT4_TYPES:
        assert -8 <= int(q.min()) and int(q.max()) <= 7  # the 4-bit kernel's range, once shifted by 8
    ours = q.double() * scale.double().repeat_interleave(group, 1) + zero.double().repeat_interleave(group, 1)
    reference = torch.from_numpy(dequantize(raw, GGML_TYPES[type_name], (rows, cols))).double()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("type_name", KEPT_TYPES)
def test_narrowed_blocks_unpack_as_the_narrowed_matrix(type_name):
    """A tensor-parallel shard cut from the unpacked tensor equals the same shard cut from the bytes."""
    rows, cols = 6, 1024
    whole = blocks_of(type_name, random_blocks(type_name, rows, cols), cols)
    cut_after = whole.narrow(2, 3, 256, 512)
    cut_before = GGUFBlocks(whole.ggml_type, whole.data, cols).unpack().narrow(2, 3, 256, 512)
    for a, b in zip(unpack_codes(cut_after), cut_before.codes):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not fall on"):
        whole.narrow(0, 1, 16, 512)


@pytest.mark.parametrize("type_name", INT4_TYPES)
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_packed_product_against_float64(type_name, num_tokens):
    rows, cols = 96, 512
    raw = random_blocks(type_name, rows, cols, seed=3)
    q, scale, zero = unpack_codes(blocks_of(type_name, raw, cols))
    x = torch.randn(num_tokens, cols)
    bias = torch.randn(rows)
    out = int4_linear(x, pack_int4((q + 8).to(torch.uint8), scale, zero, 32), bias)
    weight = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])).double()
    reference = x.double() @ weight.t() + bias.double()
    assert out.dtype == torch.float32 and out.shape == (num_tokens, rows)
    error = (out.double() - reference).norm() / reference.norm()
    assert error < 1e-2, error  # bfloat16 activations, scales and products: ~3e-3


def _write_llama_gguf(path, tensor_types: dict[str, str]) -> str:
    """A 2-layer llama file (hidden 256, intermediate 512: whole Q4_K blocks) whose linear weights are random
    blocks of the given types; embeddings and norms float32."""
    hidden, intermediate, vocab, num_heads, num_kv_heads = 256, 512, 384, 4, 2
    head_dim = hidden // num_heads
    generator = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    embedding = 0.1 * generator.standard_normal((vocab, hidden))  # logits of a few units, as trained models'
    writer.add_tensor("token_embd.weight", embedding.astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for layer in range(2):
        shapes = {"attn_q": (hidden, hidden), "attn_k": (num_kv_heads * head_dim, hidden),
                  "attn_v": (num_kv_heads * head_dim, hidden), "attn_output": (hidden, hidden),
                  "ffn_gate": (intermediate, hidden), "ffn_up": (intermediate, hidden),
                  "ffn_down": (hidden, intermediate)}
        for seed, (module, (rows, cols)) in enumerate(shapes.items()):
            type_name = tensor_types[module]
            # small weights: a random network with trained-size ones is chaotic, and amplifies any rounding
            raw = random_blocks(type_name, rows, cols, seed=100 * layer + seed, scale=0.003)
            writer.add_tensor(f"blk.{layer}.{module}.weight", raw, raw_dtype=gguf.GGMLQuantizationType[type_name])
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_model_of_every_kept_type_matches_the_dequantized_file(tmp_path):
    """q/k/v (merged) of three types and gate/up of two in one model: the next token's log-probabilities over 8
    prompts equal the float32 model's within bfloat16 rounding."""
    types = {"attn_q": "Q4_K", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "Q4_0",
             "ffn_gate": "Q4_1", "ffn_up": "Q4_K", "ffn_down": "Q4_K"}
    path = _write_llama_gguf(tmp_path / "tiny-llama.gguf", types)
    prompts = [{"prompt_token_ids": [int(t) for t in np.random.default_rng(i).integers(3, 384, 12)]}
               for i in range(8)]
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    results = {}
    for name, kwargs in {"quantized": {"quantization": "gguf"}, "float32": {"dtype": "float32"}}.items():
        llm = LLM(path, max_model_len=256, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True, **kwargs)
        assert llm.llm_engine.config.model.quantization == ("gguf" if name == "quantized" else None)
        results[name] = [out.outputs[0].logprobs[0] for out in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.shutdown()
    differences = []
    for quantized, reference in zip(results["quantized"], results["float32"]):
        assert len(set(quantized) & set(reference)) >= 4
        differences += [quantized[token].logprob - logprob.logprob for token, logprob in reference.items()
                        if token in quantized]
    # bfloat16 activations and scales (the kernel's) and an int8 head: ~0.2 % per product; the log-probs
    # spread over ~3 units, their differences stay a few hundredths
    differences = np.abs(differences)
    assert differences.mean() < 0.03 and differences.max() < 0.1, differences


def test_kept_types_through_the_gpu_kernel(tmp_path, monkeypatch):
    """The same file's layers repacked for the Triton 4-bit GEMM (the GPU's path; here under the interpreter),
    in float32: the next token's log-probabilities equal the dequantized model's to float32's noise."""
    from tokenmill.layers.quantization import int4

    monkeypatch.setattr(int4, "backend_for", lambda device_type: "triton")
    types = {"attn_q": "Q4_K", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "Q4_0",
             "ffn_gate": "Q4_1", "ffn_up": "Q4_K", "ffn_down": "Q4_K"}
    path = _write_llama_gguf(tmp_path / "tiny-llama.gguf", types)
    prompts = [{"prompt_token_ids": [int(t) for t in np.random.default_rng(i).integers(3, 384, 12)]}
               for i in range(4)]
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    results = {}
    for name, kwargs in {"kernel": {"quantization": "gguf"}, "float32": {}}.items():
        llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True,
                  **kwargs)
        if name == "kernel":
            layer = llm.llm_engine.core.worker.runner.model.model.layers[0].self_attn.qkv_proj
            assert layer.linear_method.kernel is not None and layer.quantized_weight.packed.shape == (512, 128)
            head = llm.llm_engine.core.worker.runner.model.lm_head.linear_method
            head.int8 = False  # the GPU's head (float); on the CPU it would be int8
        results[name] = [out.outputs[0].logprobs[0] for out in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.shutdown()
    for kernel, reference in zip(results["kernel"], results["float32"]):
        assert list(kernel) == list(reference)
        assert all(abs(kernel[t].logprob - reference[t].logprob) < 1e-4 for t in reference)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_model_of_every_int8_type_matches_the_dequantized_file(tmp_path, monkeypatch, backend):
    """Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 kept as block int8, q/k/v merged across Q6_K's 16-weight blocks and 32-weight
    ones: in float32, with a float head, a prompt's and a decode step's log-probabilities equal the dequantized
    model's to float32's noise, on the CPU's path and through the Triton GEMM (the GPU's; here interpreted)."""
    from tokenmill.layers.quantization import int4
    from tokenmill.layers.quantization.block_int8 import BlockInt8Weight

    monkeypatch.setattr(int4, "backend_for", lambda device_type: backend)
    types = {"attn_q": "Q6_K", "attn_k": "Q4_K", "attn_v": "Q8_0", "attn_output": "Q5_0",
             "ffn_gate": "Q5_1", "ffn_up": "Q5_K", "ffn_down": "Q6_K"}
    path = _write_llama_gguf(tmp_path / "tiny-llama.gguf", types)
    prompts = [{"prompt_token_ids": [int(t) for t in np.random.default_rng(i).integers(3, 384, 12)]}
               for i in range(4)]
    params = SamplingParams(max_tokens=2, temperature=0, logprobs=5, ignore_eos=True)
    results = {}
    for name, kwargs in {"kept": {"quantization": "gguf"}, "float32": {}}.items():
        llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True,
                  **kwargs)
        if name == "kept":
            model = llm.llm_engine.core.worker.runner.model
            qkv = model.model.layers[0].self_attn.qkv_proj.quantized_weight
            assert isinstance(qkv, BlockInt8Weight) and qkv.group == 16 and qkv.codes.shape == (256, 512)
            assert model.model.layers[0].mlp.gate_up_proj.quantized_weight.zero is not None
            model.lm_head.linear_method.int8 = False
        results[name] = [out.outputs[0].logprobs for out in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.shutdown()
    for kept, reference in zip(results["kept"], results["float32"]):
        for kept_step, reference_step in zip(kept, reference):
            assert list(kept_step) == list(reference_step)
            assert all(abs(kept_step[t].logprob - reference_step[t].logprob) < 1e-4 for t in reference_step)


def test_embedded_model_quantized_agrees_with_float32():
    """The default on the CPU (Q4_1 kept 4-bit, int8 head) against the file dequantized to float32: greedy
    tokens over 32 prompts x 64 tokens, position by position."""
    prompts = [f"Question {i}: what is {i} times {i + 3}? Answer:" if i % 2 else
               f"Write one sentence about the number {i}." for i in range(32)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    tokens = {}
    for name, kwargs in {"quantized": {}, "float32": {"dtype": "float32"}}.items():
        llm = LLM(max_model_len=512, kv_cache_memory_bytes=64 << 20, **kwargs)
        assert llm.llm_engine.config.model.quantization == ("gguf" if name == "quantized" else None)
        tokens[name] = [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.shutdown()
    same = sum(a == b for q, f in zip(tokens["quantized"], tokens["float32"]) for a, b in zip(q, f))
    agreement = same / (32 * 64)
    print(f"embedded model, quantized vs float32 greedy agreement: {agreement:.1%}")
    assert agreement >= 0.90


def test_gguf_quantization_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="is not a GGUF file"):
        LLM(tiny_model_dir("llama"), quantization="gguf", kv_cache_memory_bytes=16 << 20)
    with pytest.raises(ValueError, match="does not apply to a GGUF file"):
        LLM(quantization="fp8", kv_cache_memory_bytes=16 << 20)
