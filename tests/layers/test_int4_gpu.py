"""The 4-bit GPU GEMM (layers/quantization/int4_gpu.py) against float64 (CPU: Triton interpreter, small sizes),
and the AWQ and GPTQ methods running through it."""

from __future__ import annotations

import pytest
import torch
from quantized_llama import PROMPTS, first_layer, logprob_differences  # this folder's: pytest puts it on the path
from test_awq import write_awq
from test_gptq import write_gptq

from tokenmill import LLM
from tokenmill.layers.quantization import int4
from tokenmill.layers.quantization.int4_gpu import int4_gemm, pack_int4_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, group", [(1, 96, 128, 32), (5, 64, 192, 64), (33, 80, 256, 128)])
def test_int4_gemm_against_float64(dtype, m, n, k, group):
    torch.manual_seed(0)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // group) * 0.02 + 0.005
    zero = torch.randn(n, k // group) * 0.05
    weight = pack_int4_gpu(q, scale, zero, group, dtype)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    s = weight.scales.double().t().repeat_interleave(group, 1)  # the scales as the kernel reads them
    z = weight.zeros.double().t().repeat_interleave(group, 1)
    out = int4_gemm(x.to(DEVICE), _to(weight, DEVICE), bias.to(DEVICE)).cpu()
    reference = x.double() @ ((q.double() - 8) * s + z).t() + bias.double()
    assert out.dtype == dtype and out.shape == (m, n)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)


def _to(weight, device):
    weight.packed, weight.scales, weight.zeros = (t.to(device) for t in (weight.packed, weight.scales, weight.zeros))
    return weight


def test_layouts_the_kernel_cannot_take_are_refused():
    with pytest.raises(ValueError, match="K a multiple of 64"):
        pack_int4_gpu(torch.zeros(8, 96, dtype=torch.uint8), torch.ones(8, 3), torch.zeros(8, 3), 32, torch.float16)


@pytest.mark.parametrize("fmt", ["awq", "gptq-desc-act"])
def test_awq_and_gptq_models_through_the_gpu_kernel(fmt, tmp_path, monkeypatch):
    """The formats' layers repacked for and run through int4_gemm (the GPU's path; here under the interpreter),
    against HF on the dequantized weights."""
    monkeypatch.setattr(int4, "backend_for", lambda device_type: "triton")
    path, reference = str(tmp_path / "quantized"), str(tmp_path / "reference")
    if fmt == "awq":
        write_awq(path, reference, None)
    else:
        write_gptq(path, reference, 4, False, True, None)

    def through_the_kernel(llm: LLM) -> None:
        assert first_layer(llm).mlp.down_proj.linear_method.kernel is int4_gemm

    differences = logprob_differences(path, reference, through_the_kernel, PROMPTS[:3])
    assert max(differences) < 1e-3, differences  # float32 activations: only the order of the sums differs
