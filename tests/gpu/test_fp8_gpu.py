"""On a GPU with FP8 tensor cores: each FP8 GEMM path against a float64 reference of the dequantized inputs, and
a random-weight Llama-3.1-8B with FP8 weights and an FP8 KV cache against bf16 on greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX
from tokenmill.layers.fp8_ops import SMALL_M_16BIT_ROWS, quant_fp8
from tokenmill.layers.quantization.fp8 import fp8_linear, quantize_per_channel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m", [1, 7, 32, 256])
@pytest.mark.parametrize("static_input", [False, True])
def test_per_channel_fp8_linear(m, static_input):
    """Dynamic activations: M = 1 streams the FP8 weights through the GEMV and M <= 16 through fp8_small_m, both
    with the activations unquantized; fp8_small_m quantizes them per token up to 64 rows, torch._scaled_mm
    above. A static input scale always goes to torch._scaled_mm."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight, scale = quantize_per_channel(torch.randn(1024, 4096, device="cuda", generator=gen) * 0.02)
    bias = torch.randn(1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    input_scale = (x.float().abs().max() / FP8_MAX).reshape(()) if static_input else None
    got = fp8_linear(x, weight, scale, input_scale, bias)
    if m <= SMALL_M_16BIT_ROWS and not static_input:
        x_ref = x.double()
    elif static_input:
        x_ref = (x.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).double() * input_scale.double()
    else:
        q, s = quant_fp8(x)
        x_ref = q.double() * s.double()
    ref = x_ref @ (weight.double() * scale.double()[:, None]).T + bias.double()
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) < 1e-2


def test_fp8_weights_and_kv_cache_agree_with_bf16_on_llama_8b(tmp_path):
    """32 prompts x 64 greedy tokens of a seeded random Llama-3.1-8B, bf16 against FP8 weights (per channel, at
    load) with an FP8 KV cache: the share of positions with the same token. The figure is printed; the issue
    asks >= 95 %.

    HF's initialization alone (std 0.02 everywhere) makes a chaotic network: each layer's output dwarfs the
    residual stream, so any rounding flips most greedy tokens (0.2 % agreement measured on the H200). The
    residual projections are scaled by 1 / sqrt(2 x layers) and the embeddings given unit scale, as GPT-2
    initializes and as trained models' residual streams behave."""
    import transformers

    from tokenmill import LLM, SamplingParams
    from tokenmill.entrypoints.cli.bench.presets import PRESETS

    config = transformers.LlamaConfig(**{k: v for k, v in PRESETS["llama-3.1-8b"].items()
                                         if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_((2 * config.num_hidden_layers) ** -0.5)
            layer.mlp.down_proj.weight.mul_((2 * config.num_hidden_layers) ** -0.5)
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model.save_pretrained(tmp_path)
    del model
    prompts = [{"prompt_token_ids": torch.randint(0, 128000, (64,), generator=torch.Generator().manual_seed(i))
                .tolist()} for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    runs = {}
    for name, kwargs in (("bf16", {}), ("fp8", dict(quantization="fp8", kv_cache_dtype="fp8"))):
        llm = LLM(str(tmp_path), skip_tokenizer_init=True, max_model_len=256, gpu_memory_utilization=0.45,
                  enforce_eager=True, **kwargs)
        runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for x, y in zip(runs["bf16"], runs["fp8"]) for a, b in zip(x, y))
    agreement = same / (32 * 64)
    print(f"FP8 weights + FP8 KV vs bf16, greedy agreement over 32 x 64 tokens: {agreement:.1%}")
    assert agreement >= 0.95
