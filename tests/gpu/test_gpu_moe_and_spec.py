"""On a CUDA GPU, needing no tokenizer: the MoE and MLA families, and speculative decoding, through the whole
engine (Triton MoE and attention kernels, CUDA graphs, async scheduling).

- Each MoE family (tiny random HF checkpoints, float32) gives HF transformers' greedy tokens on the GPU with CUDA
  graphs, eagerly, and in 64-token chunks.
- Greedy with speculation (n-gram, the target as its own draft model, an EAGLE-1 and an EAGLE-3 head) gives the
  tokens of greedy without, all with CUDA graphs and async scheduling; the target as its own draft has every
  draft accepted.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_gpu_correctness import engine_greedy, hf_greedy, prompts

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COMMON = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)


def moe_config(arch: str) -> transformers.PretrainedConfig:
    if arch == "qwen3_moe":  # 16 experts, top-4, renormalized; layer 1 dense
        return transformers.Qwen3MoeConfig(**COMMON, head_dim=64, num_experts=16, num_experts_per_tok=4,
                                           moe_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[1],
                                           norm_topk_prob=True)
    if arch == "mixtral":
        return transformers.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)
    if arch == "gpt_oss":  # sliding (16 keys), full, sliding; sinks; biased experts with the clamped SwiGLU
        return transformers.GptOssConfig(**{**COMMON, "num_hidden_layers": 3, "intermediate_size": 128},
                                         head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=16)
    mla = dict(COMMON, num_hidden_layers=3, num_key_value_heads=8, first_k_dense_replace=1, kv_lora_rank=64,
               qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
               n_shared_experts=1, moe_intermediate_size=64, n_group=4, topk_group=2)
    if arch == "deepseek_v3":  # q_lora; sigmoid scores with a correction bias, group-limited
        return transformers.DeepseekV3Config(**mla, q_lora_rank=96, norm_topk_prob=True, routed_scaling_factor=2.5)
    return transformers.DeepseekV2Config(**mla, q_lora_rank=None, topk_method="group_limited_greedy",
                                         routed_scaling_factor=1.5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v2", "deepseek_v3"])
def test_moe_families_match_hf_with_graphs_eagerly_and_chunked(arch, tmp_path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(moe_config(arch), dtype=torch.float32).save_pretrained(tmp_path)
    expected = hf_greedy(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda()
                         .eval())
    runs = {"graphs": engine_greedy(str(tmp_path), "float32", enforce_eager=False),
            "eager": engine_greedy(str(tmp_path), "float32", enforce_eager=True),
            "chunked": engine_greedy(str(tmp_path), "float32", enforce_eager=False, max_num_batched_tokens=64,
                                     enable_prefix_caching=False)}
    mismatches = {name: [i for i, (a, b) in enumerate(zip(got, expected)) if a != b] for name, got in runs.items()}
    assert mismatches == {name: [] for name in runs}, mismatches


def test_gpt_oss_mxfp4_experts_kept_4bit_match_hf_on_their_values(tmp_path):
    """GPT-OSS with MXFP4 experts (kept 4-bit on the GPU) gives the greedy tokens HF gives from a float32 twin
    holding the values those codes define."""
    from tokenmill.layers.quantization.mxfp4 import dequantize_mxfp4

    torch.manual_seed(0)
    twin = transformers.AutoModelForCausalLM.from_config(moe_config("gpt_oss"), dtype=torch.float32)
    tensors = {name: t.detach().contiguous() for name, t in twin.state_dict().items()}
    quantized, generator = dict(tensors), torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        num_experts, rows, cols = tensors[name].shape  # [E, in, out]: MXFP4 stores [E, out, in / 32, 16]
        blocks = torch.randint(0, 256, (num_experts, cols, rows // 32, 16), dtype=torch.uint8, generator=generator)
        scales = torch.randint(120, 124, (num_experts, cols, rows // 32), dtype=torch.uint8, generator=generator)
        del quantized[name]
        quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
        tensors[name] = dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2).contiguous()
    twin.load_state_dict(tensors)
    twin.save_pretrained(tmp_path / "twin")
    twin.save_pretrained(tmp_path / "mxfp4")
    save_file(quantized, str(tmp_path / "mxfp4" / "model.safetensors"))
    config = json.loads((tmp_path / "mxfp4" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(config))
    expected = hf_greedy(twin.cuda().eval(), num_new=32)
    llm = LLM(str(tmp_path / "mxfp4"), dtype="float32", skip_tokenizer_init=True, max_model_len=1024,
              gpu_memory_utilization=0.3, max_num_seqs=16)
    assert llm.llm_engine.core.worker.runner.model.model.layers[0].mlp.experts.w13_weight.dtype == torch.uint8
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    mismatches = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert mismatches == [], (mismatches, got, expected)


def eagle_head(path, target_config: dict, eagle3: bool) -> str:
    """A random EAGLE-1 or EAGLE-3 head for the target, in the published layouts (EAGLE-3 with a draft
    vocabulary of half the target's)."""
    hidden, heads, kv_heads = target_config["hidden_size"], target_config["num_attention_heads"], \
        target_config["num_key_value_heads"]
    inter, vocab, head_dim = target_config["intermediate_size"], target_config["vocab_size"], hidden // heads
    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    layer, width = ("midlayer", 2 * hidden) if eagle3 else ("layers.0", hidden)
    w = {f"{layer}.self_attn.q_proj.weight": rand(heads * head_dim, width),
         f"{layer}.self_attn.k_proj.weight": rand(kv_heads * head_dim, width),
         f"{layer}.self_attn.v_proj.weight": rand(kv_heads * head_dim, width),
         f"{layer}.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
         f"{layer}.mlp.gate_proj.weight": rand(inter, hidden), f"{layer}.mlp.up_proj.weight": rand(inter, hidden),
         f"{layer}.mlp.down_proj.weight": rand(hidden, inter),
         f"{layer}.post_attention_layernorm.weight": 1 + rand(hidden)}
    config = {**target_config, "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]}
    if eagle3:
        draft_vocab = vocab // 2
        ids = torch.arange(0, vocab, 2)
        w |= {f"{layer}.input_layernorm.weight": 1 + rand(hidden), f"{layer}.hidden_norm.weight": 1 + rand(hidden),
              "fc.weight": rand(hidden, 3 * hidden), "norm.weight": 1 + rand(hidden),
              "lm_head.weight": rand(draft_vocab, hidden), "d2t": ids - torch.arange(draft_vocab),
              "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True)}
        config |= {"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": draft_vocab,
                   "eagle_aux_hidden_state_layer_ids": [0, 1, 1]}  # the target has two layers
    else:
        w["fc.weight"] = rand(hidden, 2 * hidden)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({name: t.contiguous() for name, t in w.items()}, str(path / "model.safetensors"))
    return str(path)


def spec_greedy(path: str, spec: dict | None, seqs: list[list[int]]) -> tuple[list[list[int]], dict]:
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=1024, gpu_memory_utilization=0.3,
              max_num_seqs=16, async_scheduling=True, speculative_config=spec)
    assert llm.llm_engine.core.worker.runner.mixed_graphs.graphs, "the verify steps need the mixed graphs"
    outs = llm.generate([{"prompt_token_ids": p} for p in seqs],
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.get_metrics()


def test_speculation_with_graphs_and_async_scheduling_keeps_greedy_tokens(tmp_path_factory):
    """The target's layers are scaled down, so that its next token depends mostly on the last one: a prompt
    that holds its own earlier continuation then continues it again, and n-gram drafts are found and accepted."""
    path = tmp_path_factory.mktemp("spec-target")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and "norm" not in name:
                param.mul_(0.05)
    model.save_pretrained(path)
    path = str(path)
    with open(f"{path}/config.json") as f:
        target_config = json.load(f)
    first, _ = spec_greedy(path, None, prompts())
    seqs = [p + c[:24] + p for p, c in zip(prompts(), first)]
    plain, _ = spec_greedy(path, None, seqs)
    heads = tmp_path_factory.mktemp("heads")
    runs = {"ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4},
            "self-draft": {"model": path, "num_speculative_tokens": 3},
            "eagle": {"method": "eagle", "model": eagle_head(heads / "e1", target_config, False),
                      "num_speculative_tokens": 2},
            "eagle3": {"method": "eagle3", "model": eagle_head(heads / "e3", target_config, True),
                       "num_speculative_tokens": 2}}
    results = {name: spec_greedy(path, spec, seqs) for name, spec in runs.items()}
    mismatches = {name: [i for i, (a, b) in enumerate(zip(out, plain)) if a != b]
                  for name, (out, _) in results.items()}
    assert mismatches == {name: [] for name in runs}, mismatches
    for name, (_, metrics) in results.items():
        assert metrics["vllm:spec_decode_num_drafts"] > 0, name
    assert results["ngram"][1]["vllm:spec_decode_num_accepted_tokens"] > 0
    self_metrics = results["self-draft"][1]
    assert self_metrics["vllm:spec_decode_num_accepted_tokens"] == self_metrics["vllm:spec_decode_num_draft_tokens"]
