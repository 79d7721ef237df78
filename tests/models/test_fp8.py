"""FP8 weights and the FP8 KV cache on the CPU: tiny random checkpoints written in each FP8 format, scales
included (a MoE model's experts too), load and give HF transformers' greedy tokens on the same weights
dequantized (the CPU dequantizes at load), DeepSeek's MLA models among them; block-scaled experts split over
ranks only on whole blocks;
`quantization="fp8"` quantizes a 16-bit checkpoint per channel; an e4m3 cache round-trips its
keys and values within e4m3's rounding. (The GPU's FP8 GEMMs and attention: tests/layers/test_fp8_ops.py,
tests/attention, tests/gpu.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from tokenmill import LLM, SamplingParams
from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX

PROMPTS = [[5, 17, 42, 8, 99, 3], list(range(100, 131))]
NUM_NEW = 12
BLOCK = (16, 32)


def quantize(weight: torch.Tensor, fmt: str, block: tuple[int, int] = BLOCK
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(e4m3 weight, the checkpoint's scale tensors by name suffix, the dequantized float32 weight). Blocks
    past the weight's last rows or columns are partial, as the format has them."""
    if fmt == "block":
        n, k = weight.shape
        padded = F.pad(weight, (0, -k % block[1], 0, -n % block[0]))
        blocks = padded.reshape(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
        scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
        full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
        q = (weight / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, {"weight_scale_inv": scale}, q.float() * full
    if fmt == "channel":
        scale = weight.abs().amax(dim=-1, keepdim=True) / FP8_MAX
        q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, {"weight_scale": scale}, q.float() * scale
    scale = weight.abs().amax() / FP8_MAX
    q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, {"weight_scale": scale.reshape(1), "input_scale": torch.tensor([0.02])}, q.float() * scale


QUANTIZATION_CONFIGS = {
    "block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)},
    "channel": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"],
                    "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "dynamic": False,
                                "symmetric": True},
                    "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}}},
                "kv_cache_scheme": {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}},
    "tensor": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
               "config_groups": {"group_0": {"targets": ["Linear"],
                   "weights": {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False},
                   "input_activations": {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}}}},
}


def write_fp8_checkpoint(source: str, target, fmt: str, block: tuple[int, int] = BLOCK,
                         not_converted: tuple[str, ...] = ()) -> transformers.PreTrainedModel:
    """`source`'s weights with every decoder linear layer (each MoE expert's included, DeepSeek's
    kv_a_proj_with_mqa too) in FP8 as `fmt` ships it, saved to `target`; returns the HF model with those
    weights dequantized (the reference), loaded from a copy of the checkpoint that holds them (HF's own MoE
    layers stack the experts' matrices). `not_converted`: layer names (their last part) left in 16 bits and
    listed as the config's modules_to_not_convert."""
    tensors, dequantized = {}, {}
    for name, weight in load_file(f"{source}/model.safetensors").items():
        dequantized[name] = tensors[name] = weight.contiguous()
        if ".layers." in name and name.endswith(("_proj.weight", "_proj_with_mqa.weight")) \
                and name.split(".")[-2] not in not_converted:
            tensors[name], scales, dequantized[name] = quantize(weight.float(), fmt, block)
            tensors.update({name[:-len("weight")] + suffix: s.float() for suffix, s in scales.items()})
    config = json.loads(open(f"{source}/config.json").read())
    if fmt == "channel":  # the kv_cache_scheme's per-layer scales (llm-compressor's newer names)
        for i in range(config["num_hidden_layers"]):
            tensors[f"model.layers.{i}.self_attn.k_proj.output_scale"] = torch.tensor([0.03])
            tensors[f"model.layers.{i}.self_attn.v_proj.output_scale"] = torch.tensor([0.02])
    quantization_config = QUANTIZATION_CONFIGS[fmt]
    if fmt == "block":
        quantization_config = {**quantization_config, "weight_block_size": list(block)}
    if not_converted:
        quantization_config = {**quantization_config, "modules_to_not_convert": list(not_converted)}
    reference = target.parent / f"{target.name}-dequantized"
    for folder, weights, folder_config in ((reference, dequantized, config),
                                           (target, tensors, {**config, "quantization_config": quantization_config})):
        folder.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{source}/{name}", folder / name)
        (folder / "config.json").write_text(json.dumps(folder_config))
        save_file(weights, str(folder / "model.safetensors"))
    return transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()


def hf_greedy(model) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                          use_tqdm=False)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("fmt", ["block", "channel", "tensor"])
def test_fp8_checkpoints_match_hf_on_the_dequantized_weights(arch, fmt, tiny_model_dir, tmp_path):
    """qwen3_moe's experts are FP8 too; its 64 x 64 blocks leave the experts' 32 gate, up and down
    intermediate rows or columns a partial block each (the gate's and the up's scales are separate rows)."""
    block = (64, 64) if arch == "qwen3_moe" else BLOCK
    reference = write_fp8_checkpoint(tiny_model_dir(arch), tmp_path / fmt, fmt, block)
    llm = LLM(str(tmp_path / fmt), dtype="float32", kv_cache_memory_bytes=8 << 20, max_model_len=128)
    assert greedy(llm) == hf_greedy(reference)
    attn = llm.llm_engine.core.worker.runner.kv_cache.attn_layers[0]
    expected = (0.03, 0.02) if fmt == "channel" else (1.0, 1.0)
    assert (float(attn.k_scale), float(attn.v_scale)) == pytest.approx(expected)


@pytest.mark.parametrize("arch, tp, block, not_converted", [("deepseek_v3", 1, (16, 16), ()),
                                                          ("deepseek_v3", 2, (8, 8), ()),
                                                          ("deepseek_v2", 1, (16, 16), ("kv_b_proj", "o_proj"))])
def test_deepseek_block_fp8_checkpoints_match_hf(arch, tp, block, not_converted, tiny_model_dir, tmp_path):
    """DeepSeek-V3's published form (`fmt` e4m3, `weight_block_size`; 16 x 16 blocks here): q_a_proj and
    q_b_proj (V2: q_proj), kv_a_proj_with_mqa, kv_b_proj, o_proj, the dense MLP, the shared and the routed
    experts FP8, partial blocks at kv_a's 40 rows and q_b's 24 columns; the router `gate` and the norms as they
    were. kv_b_proj ends up the dequantized matrix exactly, in the model's dtype (MLA reads it as W_UK / W_UV).
    At TP=2 (8 x 8 blocks: each rank's rows of kv_b, q_b and the experts are whole blocks) q_a and kv_a are
    whole on both ranks and rank 0 holds kv_b's first two heads. V2 with kv_b_proj and o_proj in
    modules_to_not_convert: they load as 16-bit."""
    ckpt = tmp_path / "ckpt"
    reference = write_fp8_checkpoint(tiny_model_dir(arch), ckpt, "block", block, not_converted)
    stored = load_file(str(ckpt / "model.safetensors"))
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    for name in ("self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "mlp.experts.3.down_proj"):
        expected = torch.float32 if name.split(".")[-1] in not_converted else FP8_DTYPE
        assert stored[f"model.layers.1.{name}.weight"].dtype == expected
    expected_kv_b = [layer.self_attn.kv_b_proj.weight.detach() for layer in reference.model.layers]

    def assert_kv_b_dequantized(llm: LLM, dtype: torch.dtype) -> None:
        model = llm.llm_engine.core.worker.runner.model
        for layer, expected in zip(model.model.layers, expected_kv_b):
            rows = expected.shape[0] // tp
            assert torch.equal(layer.self_attn.kv_b_proj.weight, expected[:rows].to(dtype))

    llm = LLM(str(ckpt), tensor_parallel_size=tp, dtype="float32", kv_cache_memory_bytes=8 << 20, max_model_len=128)
    try:
        assert greedy(llm) == hf_greedy(reference)
        assert_kv_b_dequantized(llm, torch.float32)
    finally:
        llm.llm_engine.shutdown()
    if tp == 1:
        assert_kv_b_dequantized(LLM(str(ckpt), dtype="bfloat16", kv_cache_memory_bytes=8 << 20, max_model_len=128),
                                torch.bfloat16)


def test_a_format_without_dequantization_refuses_a_dense_weight_layer():
    """kv_b_proj of an AWQ DeepSeek checkpoint: refused at construction, naming the layer, not run as 4-bit
    views."""
    from tokenmill.layers.linear import ColumnParallelLinear
    from tokenmill.layers.quantization.awq import AWQConfig

    awq = AWQConfig.from_config({"quant_method": "awq", "bits": 4, "group_size": 32})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.kv_b_proj: its weight is read as a matrix"):
        ColumnParallelLinear(32, 112, quant_config=awq, prefix="model.layers.0.self_attn.kv_b_proj", dense_weight=True)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe", "deepseek_v3"])
def test_online_fp8_quantizes_per_channel(arch, tiny_model_dir):
    """qwen3_moe: its experts too (HF stacks them, [E, out, in]: per channel is per last-dim row still);
    deepseek_v3: its experts, shared experts and kv_a_proj_with_mqa too, while kv_b_proj, which MLA reads as a
    matrix, keeps its 16-bit weight."""
    path = tiny_model_dir(arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if ".layers." in name and name.endswith(("_proj.weight", "_proj_with_mqa.weight", "experts.gate_up_proj",
                                                     "experts.down_proj")) and not name.endswith("kv_b_proj.weight"):
                param.copy_(quantize(param, "channel")[2])
    llm = LLM(path, quantization="fp8", dtype="float32", kv_cache_memory_bytes=8 << 20, max_model_len=128)
    assert greedy(llm) == hf_greedy(reference.eval())


@pytest.mark.parametrize("fmt, expert_parallel", [("block", False), ("tensor", True)])
def test_fp8_experts_over_two_ranks_match_hf(fmt, expert_parallel, tiny_model_dir, tmp_path):
    """16 x 16 blocks: at TP=2 each rank's 16 of the experts' 32 intermediate rows are one row of blocks (the
    scales sliced with the weights); per-tensor scales with expert parallelism: each rank loads its 4 experts'
    scales. The tokens stay HF's. (A split that cuts blocks: test_fused_moe.py.)"""
    reference = write_fp8_checkpoint(tiny_model_dir("qwen3_moe"), tmp_path / "ckpt", fmt, (16, 16))
    llm = LLM(str(tmp_path / "ckpt"), tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
              dtype="float32", kv_cache_memory_bytes=8 << 20, max_model_len=128)
    try:
        assert greedy(llm) == hf_greedy(reference)
    finally:
        llm.llm_engine.shutdown()


def test_unknown_or_contradicting_quantization_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="quantization='awq' needs a checkpoint quantized so"):
        LLM(tiny_model_dir("llama"), quantization="awq", kv_cache_memory_bytes=8 << 20, max_model_len=128)
    write_fp8_checkpoint(tiny_model_dir("llama"), tmp_path / "ckpt", "block")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    for key, value, error in (("quant_method", "bitsandbytes",
                               r"'bitsandbytes'.*supported: awq, compressed-tensors, fp8, gptq, mxfp4"),
                              ("fmt", "e5m2", "quantization_config.fmt must be e4m3.*'e5m2'")):
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(
            {**config, "quantization_config": {**config["quantization_config"], key: value}}))
        with pytest.raises(ValueError, match=error):
            LLM(str(tmp_path / "ckpt"), kv_cache_memory_bytes=8 << 20, max_model_len=128)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_kv_cache_holds_twice_the_tokens_and_stays_close(backend, tiny_model_dir):
    path = tiny_model_dir("llama")
    kwargs = dict(dtype="float32", kv_cache_memory_bytes=8 << 20, max_model_len=128, attention_backend=backend,
                  skip_tokenizer_init=True)
    full, fp8 = LLM(path, **kwargs), LLM(path, kv_cache_dtype="fp8", **kwargs)
    assert fp8.llm_engine.core.num_blocks == 4 * full.llm_engine.core.num_blocks  # 1 byte against float32's 4
    cache = fp8.llm_engine.core.worker.runner.kv_cache
    assert cache.pool.dtype == FP8_DTYPE
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    exact = full.generate(prompts, params, use_tqdm=False)
    close = fp8.generate(prompts, params, use_tqdm=False)
    for a, b in zip(exact, close):
        # the next-token distribution moves by e4m3's rounding of the keys and values only
        top_a, top_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        shared = set(top_a) & set(top_b)
        assert len(shared) >= 3
        assert max(abs(top_a[t].logprob - top_b[t].logprob) for t in shared) < 0.1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_calculate_kv_scales_takes_them_from_the_first_batch(backend, tiny_model_dir):
    """Each layer's scales become the first step's largest |key| / 200 and |value| / 100 (vLLM's rule), read off
    a float32 cache that holds the same prompts' keys and values; later steps keep them."""
    path = tiny_model_dir("llama")
    kwargs = dict(dtype="float32", kv_cache_memory_bytes=8 << 20, max_model_len=128, attention_backend=backend,
                  skip_tokenizer_init=True)
    full, fp8 = LLM(path, **kwargs), LLM(path, kv_cache_dtype="fp8", calculate_kv_scales=True, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    exact = full.generate(prompts, params, use_tqdm=False)  # the cache now holds every prompt position
    close = fp8.generate(prompts, params, use_tqdm=False)
    full_layers = full.llm_engine.core.worker.runner.kv_cache.attn_layers
    fp8_layers = fp8.llm_engine.core.worker.runner.kv_cache.attn_layers
    for i, (reference, layer) in enumerate(zip(full_layers, fp8_layers)):
        k_max, v_max = (reference.kv_cache[j].abs().max().item() for j in (0, 1))
        # layer 0's keys come from the embeddings alone; later layers' from an attention that read FP8
        tolerance = 1e-6 if i == 0 else 0.05
        assert float(layer.k_scale) == pytest.approx(k_max / 200, rel=tolerance)
        assert float(layer.v_scale) == pytest.approx(v_max / 100, rel=tolerance)
        assert not layer.calculate_kv_scales
    for a, b in zip(exact, close):
        top_a, top_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert max(abs(top_a[t].logprob - top_b[t].logprob) for t in set(top_a) & set(top_b)) < 0.1
    before = [float(layer.k_scale) for layer in fp8_layers]
    fp8.generate([{"prompt_token_ids": [7] * 40}], params, use_tqdm=False)
    assert [float(layer.k_scale) for layer in fp8_layers] == before


def test_calculate_kv_scales_needs_an_fp8_cache(tiny_model_dir):
    with pytest.raises(ValueError, match="calculate_kv_scales.*kv_cache_dtype='fp8'"):
        LLM(tiny_model_dir("llama"), calculate_kv_scales=True, kv_cache_memory_bytes=8 << 20, max_model_len=128)
