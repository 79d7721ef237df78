"""MTP speculation: a tiny random DeepSeek-V3 (three layers, YaRN, MLA, MoE past layer 0) whose checkpoint holds
one multi-token-prediction module as layer 3, in DeepSeek-V3's names: HF's save_pretrained writes the target,
and the MTP tensors (its decoder layer as HF writes a fourth layer, enorm, hnorm, eh_proj, shared_head) go in a
second safetensors file beside it (HF transformers does not model MTP, and reads only model.safetensors).

- the module's proposals after a prompt equal the argmax chain of a float64 reference of its computation written
  here, over HF's float64 run of the target, HF's DeepseekV3DecoderLayer as its decoder layer;
- greedy tokens equal greedy decoding without speculation for k = 1..3;
- a target without MTP layers is refused, naming the key.

The engine tests' module is made to agree with the target (the target's layers scaled down, so it predicts
mostly from the last token's embedding, and the module passes the embedding through eh_proj to the target's
final norm and LM head, which it shares), so drafts are accepted. The reference test's module is random and
has its own embedding and LM head."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from test_eagle import GREEDY, PROMPTS, first_proposals, generate, rms_norm

from tokenmill import LLM, SamplingParams

HIDDEN, VOCAB, LAYERS = 64, 49152, 3
MTP = f"model.layers.{LAYERS}."


def deepseek_config(num_layers: int) -> transformers.DeepseekV3Config:
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, moe_intermediate_size=16, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, attn_implementation="eager",
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 0.8})


def scaled_down(name: str) -> bool:
    return "norm" not in name and "e_score_correction_bias" not in name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smol_tokenizer) -> dict[str, str]:
    """"full": HF's four-layer model (the fourth is the MTP module's decoder layer); "target": its first three
    layers, no MTP tensors; "random" / "agree": the target with an MTP module (see the module docstring)."""
    root = tmp_path_factory.mktemp("mtp")
    torch.manual_seed(0)
    full = transformers.DeepseekV3ForCausalLM(deepseek_config(LAYERS + 1))
    with torch.no_grad():
        for name, tensor in [*full.named_parameters(), *full.named_buffers()]:
            if name.endswith("e_score_correction_bias"):  # HF starts it at zero; let it change the choice
                tensor.uniform_(-0.3, 0.3)
            elif ".layers." in name and not name.startswith(MTP) and scaled_down(name):
                tensor.mul_(0.05)
    full.save_pretrained(root / "full")
    target = transformers.DeepseekV3ForCausalLM(deepseek_config(LAYERS))
    target.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(MTP)})
    target.save_pretrained(root / "target")
    smol_tokenizer.save_pretrained(root / "target")
    with safe_open(str(root / "full" / "model.safetensors"), "pt") as f:
        block = {name: f.get_tensor(name) for name in f.keys() if name.startswith(MTP)}
    g = torch.Generator().manual_seed(1)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    random = {**block, f"{MTP}enorm.weight": 1 + rand(HIDDEN), f"{MTP}hnorm.weight": 1 + rand(HIDDEN),
              f"{MTP}eh_proj.weight": rand(HIDDEN, 2 * HIDDEN), f"{MTP}embed_tokens.weight": rand(VOCAB, HIDDEN),
              f"{MTP}shared_head.norm.weight": 1 + rand(HIDDEN),
              f"{MTP}shared_head.head.weight": rand(VOCAB, HIDDEN, scale=0.3)}
    agree = {name: t * 0.05 if scaled_down(name) else t for name, t in block.items()}
    agree |= {f"{MTP}enorm.weight": torch.ones(HIDDEN), f"{MTP}hnorm.weight": torch.ones(HIDDEN),
              f"{MTP}eh_proj.weight": torch.cat([torch.eye(HIDDEN), rand(HIDDEN, HIDDEN, scale=0.001)], dim=1),
              f"{MTP}shared_head.norm.weight": full.model.norm.weight.detach().clone()}
    paths = {"full": str(root / "full"), "target": str(root / "target")}
    for variant, tensors in (("random", random), ("agree", agree)):
        path = root / variant
        path.mkdir()
        for name in os.listdir(root / "target"):
            os.symlink(root / "target" / name, path / name)
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(path / "mtp.safetensors"))
        paths[variant] = str(path)
    paths["random_tensors"] = random
    return paths


def mtp_chain(w, layer, rotary, tokens, features, k):
    """The module's greedy chain of k drafts after tokens [P + 1] (the prompt and the target's next token),
    features [P, H] the target's output at positions 0..P-1: row p reads token p + 1 and the hidden state of p;
    `layer` is HF's decoder layer holding the module's block."""
    ids, drafts, hidden_in = list(tokens[1:]), [], list(features)
    for _ in range(k):
        n = len(ids)
        positions = torch.arange(n)
        e = w[f"{MTP}embed_tokens.weight"][torch.tensor(ids)]
        e[positions == 0] = 0
        x = torch.cat([rms_norm(e, w[f"{MTP}enorm.weight"], 1e-6),
                       rms_norm(torch.stack(hidden_in), w[f"{MTP}hnorm.weight"], 1e-6)], -1)
        x = (x @ w[f"{MTP}eh_proj.weight"].T)[None]
        mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=positions[None],
                    position_embeddings=rotary(x, positions[None]))[0]
        logits = rms_norm(out[-1], w[f"{MTP}shared_head.norm.weight"], 1e-6) @ w[f"{MTP}shared_head.head.weight"].T
        drafts.append(int(logits.argmax()))
        ids.append(drafts[-1])
        hidden_in.append(out[-1])
    return drafts


def test_proposals_equal_a_float64_reference_of_the_module(checkpoints, monkeypatch):
    """The first proposals after each prompt (k = 3) are the reference module's argmax chain over HF's float64
    run of the target (its output after the final norm)."""
    k = 3
    proposed = first_proposals(monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outputs, _ = generate(checkpoints["random"], {"method": "mtp", "num_speculative_tokens": k}, PROMPTS, params,
                          async_scheduling=False)  # (async: the second token's step has no room for drafts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["full"], dtype=torch.float64,
                                                           attn_implementation="eager", experts_implementation="eager")
    w = {name: t.double() for name, t in checkpoints["random_tensors"].items()}
    for output in outputs:
        prompt = output.prompt_token_ids
        with torch.no_grad():
            # the four-layer model's input of layer 3 is the target's last layer's output
            states = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
            features = hf.model.norm(states[LAYERS])[0]
            first = int(hf.lm_head(features[-1]).argmax())
            assert output.outputs[0].token_ids[0] == first
            expected = mtp_chain(w, hf.model.layers[LAYERS], hf.model.rotary_emb, prompt + [first], features, k)
        assert proposed[output.request_id] == expected


@pytest.fixture(scope="module")
def plain(checkpoints):
    return [o.outputs[0].token_ids for o in generate(checkpoints["target"], None, PROMPTS, GREEDY)[0]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_equal_without_speculation(k, checkpoints, plain):
    spec, metrics = generate(checkpoints["agree"], {"method": "mtp", "num_speculative_tokens": k}, PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in spec] == plain
    assert metrics["vllm:spec_decode_num_drafts"] > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > metrics["vllm:spec_decode_num_draft_tokens"] / 2


@pytest.mark.parametrize("arch, message", [
    ("deepseek_v2", r"needs multi-token-prediction layers; .* num_nextn_predict_layers is None"),
    ("target", r"sets num_nextn_predict_layers 1 but its checkpoint has no MTP tensors \(model.layers.3.\*\)"),
])
def test_a_target_without_mtp_layers_is_refused(arch, message, checkpoints, tiny_model_dir):
    model = checkpoints["target"] if arch == "target" else tiny_model_dir(arch)
    with pytest.raises(ValueError, match=f"speculative_config.method 'mtp'.*{message}"):
        LLM(model, dtype="float32", kv_cache_memory_bytes=8 << 20,
            speculative_config={"method": "mtp", "num_speculative_tokens": 2})
