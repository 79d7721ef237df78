"""EAGLE-1 and EAGLE-3 heads in their checkpoint layouts beside a tiny random Llama target (float32, eight
layers, so EAGLE-3 reads vLLM's layers 2, 4 and 5):

- the head's proposals after a prompt equal the argmax chain of a float64 reference of the head's computation
  written here, fed the hidden states of HF transformers' run of the target;
- greedy tokens equal greedy decoding without speculation for k = 1..5, and in a mixed greedy / sampled batch
  preempted in a tiny pool with a stop string landing inside an accepted run;
- heads that do not fit the target are refused, naming the key.

The EAGLE-1 head of the engine tests is made to agree with the target (its layers and the target's nearly
zero, so both predict from the last token's embedding, and fc passes the embedding on): drafts are accepted,
so accepted runs are exercised. The EAGLE-3 head is random (its draft vocabulary of 4096 tokens holding the
plain run's tokens)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_spec_engine import generate as generate_checked

from tokenmill import LLM, SamplingParams

PROMPTS = ["The capital of France is Paris. The capital of", "1, 2, 3, 4, 5, 1, 2, 3,",
           "red green blue red green blue", "def add(a, b):\n    return a + b\n"]
HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, LAYERS = 64, 4, 2, 128, 49152, 8
DRAFT_VOCAB = 4096


@pytest.fixture(scope="module")
def target(tmp_path_factory, smol_tokenizer) -> str:
    """The target: layers scaled down by 20, so its next token depends mostly on the last token."""
    path = tmp_path_factory.mktemp("eagle-target")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, initializer_range=0.1, bos_token_id=1,
                                      eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and "norm" not in name:
                param.mul_(0.05)
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


def head_config(eagle3: bool, **overrides) -> dict:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                      num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      rms_norm_eps=1e-5).to_dict()
    config["architectures"] = ["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLM"]
    if eagle3:
        config["draft_vocab_size"] = DRAFT_VOCAB
    return {**config, **overrides}


def head_weights(eagle3: bool, seed: int, agree: bool = False, draft_ids: list[int] = ()) -> dict:
    """Random head tensors in the published names. agree (EAGLE-1): fc passes the embedding on, the layer's
    weights are small. EAGLE-3: its LM head covers the draft ids (then other ids up to DRAFT_VOCAB)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    hd, layer = HIDDEN // HEADS, "midlayer" if eagle3 else "layers.0"
    width = 2 * HIDDEN if eagle3 else HIDDEN
    scale = 0.005 if agree else 0.1
    w = {f"{layer}.self_attn.q_proj.weight": rand(HEADS * hd, width, scale=scale),
         f"{layer}.self_attn.k_proj.weight": rand(KV_HEADS * hd, width, scale=scale),
         f"{layer}.self_attn.v_proj.weight": rand(KV_HEADS * hd, width, scale=scale),
         f"{layer}.self_attn.o_proj.weight": rand(HIDDEN, HEADS * hd, scale=scale),
         f"{layer}.mlp.gate_proj.weight": rand(INTERMEDIATE, HIDDEN, scale=scale),
         f"{layer}.mlp.up_proj.weight": rand(INTERMEDIATE, HIDDEN, scale=scale),
         f"{layer}.mlp.down_proj.weight": rand(HIDDEN, INTERMEDIATE, scale=scale),
         f"{layer}.post_attention_layernorm.weight": 1 + rand(HIDDEN)}
    if eagle3:
        ids = list(dict.fromkeys([*draft_ids, *range(VOCAB)]))[:DRAFT_VOCAB]
        ordered = torch.tensor(sorted(ids))
        w |= {f"{layer}.input_layernorm.weight": 1 + rand(HIDDEN), f"{layer}.hidden_norm.weight": 1 + rand(HIDDEN),
              "fc.weight": rand(HIDDEN, 3 * HIDDEN), "norm.weight": 1 + rand(HIDDEN),
              "lm_head.weight": rand(DRAFT_VOCAB, HIDDEN, scale=0.3), "d2t": ordered - torch.arange(DRAFT_VOCAB),
              "t2d": torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, ordered, True)}
    elif agree:
        w["fc.weight"] = torch.cat([torch.eye(HIDDEN), rand(HIDDEN, HIDDEN, scale=0.001)], dim=1)
    else:
        w |= {"fc.weight": rand(HIDDEN, 2 * HIDDEN), "fc.bias": rand(HIDDEN)}
    return w


def write_head(path, eagle3: bool, weights: dict, pickled: bool = False, **config) -> str:
    """The head's config.json and weights: model.safetensors, or pytorch_model.bin (`pickled`, as the published
    EAGLE heads ship)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(head_config(eagle3, **config)))
    tensors = {name: t.contiguous() for name, t in weights.items()}
    if pickled:
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        save_file(tensors, str(path / "model.safetensors"))
    return str(path)


generate = functools.partial(generate_checked, max_model_len=256, kv_cache_memory_bytes=16 << 20)


def first_proposals(monkeypatch) -> dict[str, list[int]]:
    """Each request's first drafts, recorded as the runner proposes them (filled while the engine runs; under
    async scheduling only for requests whose next step verifies drafts)."""
    from tokenmill.worker.model_runner import ModelRunner

    proposed: dict[str, list[int]] = {}
    propose = ModelRunner._propose

    def spy(runner, output, drafting=None):
        found = propose(runner, output, drafting)
        for req_id, drafts in zip(output.req_ids, found):
            if drafting is None or req_id in drafting:  # (the others were not asked for drafts)
                proposed.setdefault(req_id, drafts)
        return found

    monkeypatch.setattr(ModelRunner, "_propose", spy)
    return proposed


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(target):
    return [o.outputs[0].token_ids for o in generate(target, None, PROMPTS, GREEDY)[0]]


@pytest.fixture(scope="module")
def heads(target, plain, tmp_path_factory) -> dict[str, str]:
    """The engine tests' heads: EAGLE-1 agreeing with the target, EAGLE-3 random."""
    root = tmp_path_factory.mktemp("heads")
    used = sorted({t for tokens in plain for t in tokens})
    return {"eagle": write_head(root / "eagle", False, head_weights(False, 1, agree=True)),
            "eagle3": write_head(root / "eagle3", True, head_weights(True, 2, draft_ids=used))}


# ---- the float64 reference of the heads ---------------------------------------------------------------------

def rms_norm(x, weight, eps=1e-5):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x, positions, theta=10000.0):
    """HF's rotary embedding (halves rotated) of x [T, heads, d] at positions [T]."""
    d = x.shape[-1]
    angles = positions[:, None].double() / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def layer(w, prefix, x, residual, positions):
    """A Llama layer over x (already normed) with the residual stream `residual`: causal attention, MLP."""
    hd, n = HIDDEN // HEADS, x.shape[0]
    q = rotate((x @ w[f"{prefix}.self_attn.q_proj.weight"].T).view(n, HEADS, hd), positions)
    k = rotate((x @ w[f"{prefix}.self_attn.k_proj.weight"].T).view(n, KV_HEADS, hd), positions)
    v = (x @ w[f"{prefix}.self_attn.v_proj.weight"].T).view(n, KV_HEADS, hd)
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, HEADS * hd)
    h = residual + attn @ w[f"{prefix}.self_attn.o_proj.weight"].T
    m = rms_norm(h, w[f"{prefix}.post_attention_layernorm.weight"])
    gate, up = m @ w[f"{prefix}.mlp.gate_proj.weight"].T, m @ w[f"{prefix}.mlp.up_proj.weight"].T
    return h + (torch.nn.functional.silu(gate) * up) @ w[f"{prefix}.mlp.down_proj.weight"].T


def reference_chain(w, eagle3: bool, embed, lm_head, tokens, features, k):
    """The head's greedy chain of k drafts after tokens [P + 1] (the prompt and the target's next token),
    features [P, D] the target's at positions 0..P-1: row p reads token p + 1 and the hidden state of p."""
    # EAGLE-3's fc brings the target's three layers down to one hidden state; later rows read the head's own.
    ids, drafts = list(tokens[1:]), []
    hidden_in = list(features @ w["fc.weight"].T if eagle3 else features)
    for _ in range(k):
        positions = torch.arange(len(ids))
        e = embed[torch.tensor(ids)]
        h = torch.stack(hidden_in)
        if eagle3:
            x = torch.cat([rms_norm(e, w["midlayer.input_layernorm.weight"]),
                           rms_norm(h, w["midlayer.hidden_norm.weight"])], -1)
            out = layer(w, "midlayer", x, h, positions)
            draft_logits = rms_norm(out[-1], w["norm.weight"]) @ w["lm_head.weight"].T
            token = int(draft_logits.argmax() + w["d2t"][draft_logits.argmax()])
        else:
            x = torch.cat([e, h], -1) @ w["fc.weight"].T + w["fc.bias"]
            out = layer(w, "layers.0", x, x, positions)
            token = int((out[-1] @ lm_head.T).argmax())
        drafts.append(token)
        ids.append(token)
        hidden_in.append(out[-1])
    return drafts


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_proposals_equal_a_float64_reference_of_the_head(method, target, tmp_path, monkeypatch):
    """The first proposals after each prompt (a random head, k = 3) are the reference head's argmax chain over
    HF's float64 run of the target: its final hidden state (EAGLE-1, its head a pytorch_model.bin) or the inputs
    of layers 2, 4, 5."""
    eagle3, k = method == "eagle3", 3
    weights = head_weights(eagle3, seed=7)
    head = write_head(tmp_path / method, eagle3, weights, pickled=not eagle3)
    proposed = first_proposals(monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outputs, _ = generate(target, {"method": method, "model": head, "num_speculative_tokens": k}, PROMPTS, params,
                          async_scheduling=False)  # (async: the second token's step has no room for drafts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    embed, lm_head = hf.model.embed_tokens.weight.detach(), hf.lm_head.weight.detach()
    w = {name: t.double() if t.is_floating_point() else t for name, t in weights.items()}
    for output in outputs:
        prompt = output.prompt_token_ids
        with torch.no_grad():
            run = hf(torch.tensor([prompt]), output_hidden_states=True)
        first = int(run.logits[0, -1].argmax())
        assert output.outputs[0].token_ids[0] == first
        states = [s[0] for s in run.hidden_states]  # [i]: entering layer i; [-1]: after the final norm
        features = torch.cat([states[2], states[4], states[5]], -1) if eagle3 else states[-1]
        expected = reference_chain(w, eagle3, embed, lm_head, prompt + [first], features, k)
        assert proposed[output.request_id] == expected


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_greedy_tokens_equal_without_speculation(method, k, target, plain, heads):
    spec, metrics = generate(target, {"method": method, "model": heads[method], "num_speculative_tokens": k},
                             PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in spec] == plain
    assert metrics["vllm:spec_decode_num_drafts"] > 0
    if method == "eagle":  # the agreeing head
        assert metrics["vllm:spec_decode_num_accepted_tokens"] > metrics["vllm:spec_decode_num_draft_tokens"] / 2


@pytest.mark.parametrize("method, async_scheduling", [("eagle", True), ("eagle", False), ("eagle3", True)])
def test_mixed_batch_preempted_with_a_stop_string_inside_an_accepted_run(method, async_scheduling, target, plain,
                                                                         heads):
    """Greedy requests (one stopping at a string a few tokens into its output) beside seeded sampled ones, in
    a pool of 8 blocks that preempts: the greedy ones equal the run without speculation, with async scheduling
    (placeholder drafts) and without."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    text = tokenizer.decode(plain[0])
    stop = text[len(tokenizer.decode(plain[0][:6])):][:3]
    stopping = SamplingParams(temperature=0, max_tokens=20, stop=[stop])
    sampled = SamplingParams(temperature=0.8, seed=4, max_tokens=20, ignore_eos=True)
    prompts = PROMPTS + PROMPTS[:2]
    params = [stopping, GREEDY, GREEDY, GREEDY, sampled, sampled]
    base, _ = generate(target, None, prompts, params, max_model_len=64, kv_cache_memory_bytes=1 << 20)
    spec, metrics = generate(target, {"method": method, "model": heads[method], "num_speculative_tokens": 4},
                             prompts, params, max_model_len=64, kv_cache_memory_bytes=288 << 10,  # 8 blocks
                             async_scheduling=async_scheduling)
    for a, b, p in zip(spec, base, params):
        if p.temperature == 0:
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].text == b.outputs[0].text and a.outputs[0].finish_reason == b.outputs[0].finish_reason
        else:
            assert len(a.outputs[0].token_ids) == 20
    assert spec[0].outputs[0].finish_reason == "stop" and len(spec[0].outputs[0].token_ids) < 20
    assert metrics["vllm:num_preemptions"] > 0 and metrics["vllm:spec_decode_num_drafts"] > 0
    if method == "eagle":
        assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0


@pytest.mark.parametrize("method, weights, config, message", [
    ("eagle", {}, {"vocab_size": 1000}, "vocabulary of 1000 tokens; the target's has 49152"),
    ("eagle", {}, {"hidden_size": 32}, "reads a hidden size of 32; the target's is 64"),
    ("eagle", {"eagle3": True}, {}, "is an EAGLE-3 head .*; use method eagle3"),
    ("eagle3", {}, {}, "is an EAGLE-1/2 head .*; use method eagle"),
    ("eagle3", {"eagle3": True}, {"eagle_aux_hidden_state_layer_ids": [1, 4, 8]},
     r"reads the hidden states of layers \[1, 4, 8\]; the target has 8 layers"),
])
def test_heads_that_do_not_fit_are_refused(method, weights, config, message, target, tmp_path):
    eagle3 = weights.get("eagle3", False)
    head = write_head(tmp_path, eagle3, head_weights(eagle3, seed=3), **config)
    with pytest.raises(ValueError, match=f"speculative_config.model .*{message}"):
        LLM(target, dtype="float32", kv_cache_memory_bytes=8 << 20,
            speculative_config={"method": method, "model": head, "num_speculative_tokens": 2})


@pytest.mark.parametrize("spec, message", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.model must name"),
    ({"method": "eagle3", "model": "HEAD", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
     "speculative_config.draft_tensor_parallel_size must be"),
])
def test_bad_eagle_config_is_refused_naming_the_key(spec, message, target, heads):
    spec = {key: heads["eagle3"] if value == "HEAD" else value for key, value in spec.items()}
    with pytest.raises(ValueError, match=message):
        LLM(target, dtype="float32", kv_cache_memory_bytes=8 << 20, speculative_config=spec)
