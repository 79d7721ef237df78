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
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2)
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


def engine_greedy(path: str, dtype: str, enforce_eager: bool, num_new: int = 48, **kwargs) -> list[list[int]]:
    llm = LLM(path, dtype=dtype, skip_tokenizer_init=True, enforce_eager=enforce_eager, max_model_len=1024,
              gpu_memory_utilization=0.3, max_num_seqs=16, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()],
                        SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_float32_greedy_matches_hf_and_graphs_match_eager(model_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    expected = []
    for p in prompts():
        ids = torch.tensor([p], device="cuda")
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, min_new_tokens=48,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    graphs = engine_greedy(model_dir, "float32", enforce_eager=False)
    eager = engine_greedy(model_dir, "float32", enforce_eager=True)
    chunked = engine_greedy(model_dir, "float32", enforce_eager=False, max_num_batched_tokens=64,
                            enable_prefix_caching=False)
    mismatches = {name: [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
                  for name, got in (("graphs", graphs), ("eager", eager), ("chunked", chunked))}
    assert mismatches == {"graphs": [], "eager": [], "chunked": []}, (mismatches, graphs, expected)


def test_bf16_teacher_forced_top1_agreement(model_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(model_dir, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024,
              gpu_memory_utilization=0.3, max_num_seqs=16)
    seqs = prompts()
    outs = llm.generate([{"prompt_token_ids": p} for p in seqs],
                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    agree = total = 0
    for seq, out in zip(seqs, outs):
        if len(seq) < 2:
            continue
        with torch.no_grad():
            ref = hf(torch.tensor([seq], device="cuda")).logits[0].float()
        for pos in range(1, len(seq)):
            top1 = next(t for t, lp in out.prompt_logprobs[pos].items() if lp.rank == 1)
            # bf16 logits tie often; our top-1 agrees if it is one of HF's (possibly tied) maxima
            agree += int(ref[pos - 1, top1] == ref[pos - 1].max())
            total += 1
    assert agree / total >= 0.99, (agree, total)
