"""On a CUDA GPU: the whole engine (Triton attention, CUDA graphs) against HF transformers.

CI has no GPU, so these run on the device machine (`pytest tests/gpu tests/attention`); the kernels
alone are also checked on CPU under TRITON_INTERPRET=1 by tests/attention.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LENGTHS = (1, 5, 16, 17, 40, 100, 130, 257)


def tiny_dir(tmp_path_factory, arch: str) -> str:
    common = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    config = (transformers.LlamaConfig(**common) if arch == "llama"
              else transformers.Qwen3Config(**common, head_dim=64, tie_word_embeddings=True))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"gpu-{arch}")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request, tmp_path_factory):
    return tiny_dir(tmp_path_factory, request.param)


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 4096, (n,), generator=generator).tolist() for n in LENGTHS]


def engine_greedy(path: str, dtype: str, enforce_eager: bool, num_new: int = 48, repeat: bool = False,
                  **kwargs) -> list[list[int]]:
    """Greedy outputs for prompts(); with `repeat`, those of a second pass, whose prompts hit the prefix
    cache (small steps over long cached prefixes: the mixed-step graphs with key splits)."""
    kwargs.setdefault("max_num_seqs", 16)
    llm = LLM(path, dtype=dtype, skip_tokenizer_init=True, enforce_eager=enforce_eager, max_model_len=1024,
              gpu_memory_utilization=0.3, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    if repeat:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
        assert sum(o.num_cached_tokens for o in outs) > 0
    return [o.outputs[0].token_ids for o in outs]


def hf_greedy(model, num_new: int = 48) -> list[list[int]]:
    """HF transformers' greedy tokens for prompts(), each prompt alone (no padding)."""
    expected = []
    for p in prompts():
        ids = torch.tensor([p], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new,
                             min_new_tokens=num_new, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    return expected


def test_float32_greedy_matches_hf_and_graphs_match_eager(model_dir):
    expected = hf_greedy(transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
                         .eval())
    graphs = engine_greedy(model_dir, "float32", enforce_eager=False)
    eager = engine_greedy(model_dir, "float32", enforce_eager=True)
    chunked = engine_greedy(model_dir, "float32", enforce_eager=False, max_num_batched_tokens=64,
                            enable_prefix_caching=False)
    cached = engine_greedy(model_dir, "float32", enforce_eager=False, repeat=True, max_num_seqs=1)
    runs = (("graphs", graphs), ("eager", eager), ("chunked", chunked), ("cached", cached))
    mismatches = {name: [i for i, (a, b) in enumerate(zip(got, expected)) if a != b] for name, got in runs}
    assert mismatches == {name: [] for name, _ in runs}, (mismatches, graphs, expected)


def test_bf16_teacher_forced_top1_agreement(model_dir):
    """bf16 is as accurate as HF's bf16: our top-1 agrees with HF float32's at least as often as HF
    bf16's does (less one point), and with HF bf16's (tied) top-1 at >= 95 % of positions.

    On these tiny random models two bf16 implementations cannot agree at 99 %: bf16 rounding alone moves
    the top-1 at ~8 % of positions (measured on the H100: HF bf16 vs HF float32 91.9 %, ours vs HF float32
    91.8 %, ours vs HF bf16 96.6 %)."""
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    llm = LLM(model_dir, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024,
              gpu_memory_utilization=0.3, max_num_seqs=16)
    seqs = [s for s in prompts() if len(s) >= 2]
    outs = llm.generate([{"prompt_token_ids": p} for p in seqs],
                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    agree = ours_vs_fp32 = hf16_vs_fp32 = total = 0
    for seq, out in zip(seqs, outs):
        ids = torch.tensor([seq], device="cuda")
        with torch.no_grad():
            ref16 = hf16(ids).logits[0].float()
            top32 = hf32(ids).logits[0].argmax(-1)
        for pos in range(1, len(seq)):
            top1 = next(t for t, lp in out.prompt_logprobs[pos].items() if lp.rank == 1)
            agree += int(ref16[pos - 1, top1] == ref16[pos - 1].max())  # bf16 logits tie often
            ours_vs_fp32 += int(top1 == top32[pos - 1])
            hf16_vs_fp32 += int(ref16[pos - 1].argmax() == top32[pos - 1])
            total += 1
    report = dict(vs_hf_bf16=agree / total, ours_vs_fp32=ours_vs_fp32 / total, hf_bf16_vs_fp32=hf16_vs_fp32 / total)
    assert ours_vs_fp32 / total >= hf16_vs_fp32 / total - 0.01, report
    assert agree / total >= 0.95, report


def test_host_tier_copies_equal_recompute_under_pressure(tmp_path_factory):
    """The host tier on the GPU (copies out on a side stream, copies in waiting only for the host blocks
    they read): with a device pool of a few sequences, outputs equal those of recomputing every prompt."""
    path = tiny_dir(tmp_path_factory, "llama")
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 4096, (200,), generator=gen).tolist()
    strangers = [torch.randint(3, 4096, (300,), generator=gen).tolist() for _ in range(6)]
    # three strangers (19 blocks each) push the shared prefix out of the 48-block pool between its uses
    prompts = [shared + [3], *strangers[:3], shared + [4, 5], *strangers[3:], shared[:150] + [6]]

    def run(offload_gib: float, caching: bool) -> tuple[list[list[int]], int]:
        probe = LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=512, kv_cache_memory_bytes=1 << 24)
        per_block = probe.llm_engine.core.worker.kv_bytes_per_block()
        del probe
        llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=512, max_num_seqs=4,
                  kv_cache_memory_bytes=48 * per_block, enable_prefix_caching=caching, kv_offload_size=offload_gib)
        outs = [llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        return outs, llm.llm_engine.core.stats().prefix_cache_host_hits

    tiered, host_hits = run(0.05, True)
    plain, _ = run(0.0, False)
    assert host_hits > 0
    assert tiered == plain
