"""HF-directory loading (single and sharded), random weights, hub errors and KV-cache sizing errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams

PROMPT = {"prompt_token_ids": [11, 22, 33, 44, 55]}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def generate(llm: LLM) -> list[int]:
    return llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_sharded_safetensors_load_like_a_single_file(tiny_model_dir, tmp_path):
    single = tiny_model_dir("qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    kwargs = dict(skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=8 << 20, max_model_len=256)
    assert generate(LLM(str(tmp_path), **kwargs)) == generate(LLM(single, **kwargs))


def test_pytorch_bin_shards_load_like_safetensors(tiny_model_dir, tmp_path):
    """A checkpoint of PyTorch pickles only (pytorch_model-*.bin and their index, as older checkpoints and the
    published EAGLE heads ship) loads as load_format "pt" to the same weights."""
    single = tiny_model_dir("qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    state = model.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, shard in shards.items():
        torch.save({name: state[name].clone() for name in shard}, tmp_path / file)
    with open(tmp_path / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"weight_map": {name: file for file, shard in shards.items() for name in shard}}, f)
    model.config.save_pretrained(tmp_path)
    kwargs = dict(skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=8 << 20, max_model_len=256)
    llm = LLM(str(tmp_path), **kwargs)
    assert llm.llm_engine.source.format == "pt"
    assert generate(llm) == generate(LLM(single, **kwargs))


def test_dummy_weights_need_only_a_config(tmp_path):
    config = transformers.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=128)
    config.save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 20)
    tokens = generate(llm)
    assert len(tokens) == 8 and all(0 <= t < 300 for t in tokens)
    with pytest.raises(FileNotFoundError, match="dummy"):
        LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 20)


def test_unreachable_hub_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not get model 'no-such-org/no-such-model'"):
        LLM("no-such-org/no-such-model")


def test_too_small_kv_cache_is_a_startup_error(tiny_model_dir):
    with pytest.raises(ValueError, match="fewer than one sequence of max_model_len=512"):
        LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 12, max_model_len=512)


def test_cli_generate_and_chat():
    common = ["--max-tokens", "8", "--max-model-len", "512", "--kv-cache-memory-bytes", str(32 << 20)]
    out = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "generate", "The capital of France is",
                          *common], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    prompt = "The capital of France is"
    assert out.stdout.startswith(prompt) and len(out.stdout.strip()) > len(prompt)
    chat = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "chat", *common],
                          input="Hello!\n\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("> ") and len(chat.stdout.strip()) > 2


def test_dummy_weights_at_deepseek_v2_lite_attention_sizes(tmp_path):
    """MLA at a real checkpoint's attention sizes (DeepSeek-V2-Lite: 16 heads, kv_lora_rank 512, rope 64) with
    V3's router on few small experts, from a config alone: a block holds 576 values a token per layer."""
    config = transformers.DeepseekV3Config(
        vocab_size=1024, hidden_size=2048, intermediate_size=1024, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=4096)
    config.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              kv_cache_memory_bytes=1 << 20, max_model_len=64)
    assert llm.llm_engine.core.worker.kv_bytes_per_block() == 2 * 16 * 576 * 2
    tokens = generate(llm)
    assert len(tokens) == 8 and all(0 <= t < 1024 for t in tokens)
