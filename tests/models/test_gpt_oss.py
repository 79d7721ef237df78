"""GPT-OSS beyond the greedy comparison with HF (tests/models/test_models_vs_hf.py): its MXFP4 checkpoints and
its real size."""

from __future__ import annotations

import json
import shutil

import torch
import transformers
from safetensors.torch import load_file, save_file

from tokenmill import LLM, SamplingParams
from tokenmill.layers.quantization.mxfp4 import E2M1_VALUES, dequantize_mxfp4

MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                   "model.layers.*.mlp.router", "model.embed_tokens",
                                                                   "lm_head"]}


def e2m1_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 from its definition, element by element in float64: byte j of a block holds elements 2j (low
    nibble) and 2j + 1 (high), each times 2^(scale - 127)."""
    flat_blocks, flat_scales = blocks.reshape(-1, 16).tolist(), scales.reshape(-1).tolist()
    rows = []
    for block, scale in zip(flat_blocks, flat_scales):
        row = []
        for byte in block:
            row += [E2M1_VALUES[byte & 15] * 2.0 ** (scale - 127), E2M1_VALUES[byte >> 4] * 2.0 ** (scale - 127)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def test_mxfp4_checkpoint_loads_as_its_dequantized_twin(tiny_model_dir, tmp_path):
    """Random MXFP4 experts (codes of every value, scales around 2^0) in one checkpoint, their values as 16-bit
    `gate_up_proj` [E, H, 2I] / `down_proj` [E, I, H] in another: the two load to the same parameters, and
    the MXFP4 one generates what HF generates from the twin."""
    source = tiny_model_dir("gpt_oss")
    tensors = load_file(f"{source}/model.safetensors")
    generator = torch.Generator().manual_seed(0)
    quantized, twin = dict(tensors), dict(tensors)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        num_experts, rows, cols = tensors[name].shape  # [E, in, out]: MXFP4 stores [E, out, in / 32, 16]
        blocks = torch.randint(0, 256, (num_experts, cols, rows // 32, 16), dtype=torch.uint8, generator=generator)
        scales = torch.randint(123, 129, (num_experts, cols, rows // 32), dtype=torch.uint8, generator=generator)
        del quantized[name]
        quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
        twin[name] = e2m1_reference(blocks, scales).transpose(1, 2).float().contiguous()
    for folder, weights in (("mxfp4", quantized), ("twin", twin)):
        shutil.copytree(source, tmp_path / folder)
        save_file(weights, tmp_path / folder / "model.safetensors")
    config = json.loads((tmp_path / "mxfp4" / "config.json").read_text())
    (tmp_path / "mxfp4" / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG}))

    llms = [LLM(str(tmp_path / folder), dtype="float32", kv_cache_memory_bytes=4 << 20, max_model_len=128)
            for folder in ("mxfp4", "twin")]
    models = [llm.llm_engine.core.worker.runner.model for llm in llms]
    params = [dict(model.named_parameters()) for model in models]
    assert params[0].keys() - {n for n in params[0] if n.endswith("_weight_scale")} == params[1].keys()
    for name in params[1]:
        ours = params[0][name]
        if ours.dtype == torch.uint8:  # kept MXFP4 (on a GPU): its values
            ours = dequantize_mxfp4(ours.unflatten(-1, (-1, 16)), params[0][f"{name}_scale"], torch.float32)
        assert torch.equal(ours, params[1][name]), name

    prompt = list(range(5, 25))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "twin", dtype=torch.float32).eval()
    expected = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 20, dtype=torch.long),
                                 max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:]
    out = llms[0].generate([{"prompt_token_ids": prompt}],
                           SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected.tolist()


def test_gpt_oss_20b_builds_at_its_real_size():
    """The published 20B config (its config.json's fields) builds, on the meta device: 20.9 B parameters, of
    which 19.1 B in the experts, windows of 128 keys on every other layer."""
    from tokenmill.models.gpt_oss import GptOssForCausalLM

    config = transformers.GptOssConfig(
        num_hidden_layers=24, num_local_experts=32, vocab_size=201088, hidden_size=2880, intermediate_size=2880,
        head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128, num_experts_per_tok=4,
        max_position_embeddings=131072, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                         "original_max_position_embeddings": 4096})
    with torch.device("meta"):
        model = GptOssForCausalLM(config, 4096)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert round(total / 1e9, 1) == 20.9 and round(experts / 1e9, 1) == 19.1
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [128, None] * 12
