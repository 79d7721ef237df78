"""Block-scaled int8 weights (layers/quantization/block_int8.py): the CPU's product (the per-block bmm of a few
rows, the dequantized GEMM of many) and the Triton GEMM (CPU: the interpreter, small sizes) against float64."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.quantization import block_int8
from tokenmill.layers.quantization.block_int8_gpu import block_int8_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_weight(n: int, k: int, group: int, with_zero: bool) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // group) * 0.002 + 0.0005
    zero = torch.randn(n, k // group) * 0.05 if with_zero else torch.zeros(n, k // group)
    return codes, scale, zero


def reference(x: torch.Tensor, weight: block_int8.BlockInt8Weight, bias: torch.Tensor) -> torch.Tensor:
    """x @ W.T + bias in float64, from the weight as packed (its scales in the model's dtype)."""
    w = weight.codes.double() * weight.scale.double().repeat_interleave(weight.group, 0)
    if weight.zero is not None:
        w += weight.zero.double().repeat_interleave(weight.group, 0)
    return x.double() @ w + bias.double()


@pytest.mark.parametrize("num_tokens", [1, 7, block_int8.BMM_MAX_ROWS + 9])
@pytest.mark.parametrize("group, with_zero", [(16, False), (32, True)])
def test_cpu_product_against_float64(num_tokens, group, with_zero):
    weight, kernel = block_int8.pack(*random_weight(96, 256, group, with_zero), group, torch.float32)
    assert kernel is block_int8.block_int8_linear and (weight.zero is not None) == with_zero
    x = torch.randn(3, num_tokens, 256)
    bias = torch.randn(96)
    out = kernel(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (3, num_tokens, 96)
    torch.testing.assert_close(out.double(), reference(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k, group, with_zero", [(1, 96, 128, 16, False), (5, 64, 192, 32, True),
                                                       (33, 80, 256, 16, True)])
def test_triton_gemm_against_float64(dtype, m, n, k, group, with_zero):
    codes, scale, zero = random_weight(n, k, group, with_zero)
    weight = block_int8.BlockInt8Weight(codes.t().contiguous().to(DEVICE), scale.t().to(dtype).contiguous().to(DEVICE),
                                        zero.t().to(dtype).contiguous().to(DEVICE) if with_zero else None, group)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    out = block_int8_gemm(x.to(DEVICE), weight, bias.to(DEVICE)).cpu()
    weight.codes, weight.scale = weight.codes.cpu(), weight.scale.cpu()
    weight.zero = weight.zero.cpu() if with_zero else None
    assert out.dtype == dtype and out.shape == (m, n)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), reference(x, weight, bias), rtol=tolerance, atol=tolerance)


def test_shapes_the_layout_cannot_take_are_refused():
    codes, scale, zero = random_weight(8, 64, 32, False)
    with pytest.raises(ValueError, match=r"need scale and zero \(8, 4\)"):
        block_int8.pack(codes, scale, zero, 16, torch.float32)
    weight = block_int8.BlockInt8Weight(torch.zeros(48, 8, dtype=torch.int8), torch.ones(3, 8), None, 16)
    with pytest.raises(ValueError, match="K=48 must be a multiple of 32"):
        block_int8_gemm(torch.randn(1, 48), weight)
