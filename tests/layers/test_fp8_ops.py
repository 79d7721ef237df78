"""The FP8 kernels against float64 references of the dequantized inputs (CPU: Triton interpreter, tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX
from tokenmill.layers.fp8_ops import block_fp8_matmul, fp8_gemv, fp8_small_m, quant_fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def block_scaled(n: int, k: int, block: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random e4m3 weight [n, k] and its block scales, as a checkpoint ships them."""
    weight = (torch.randn(n, k, generator=gen) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    scale = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) * 0.01 + 1e-3
    return weight.to(DEVICE), scale.to(DEVICE)


def dequant_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    full = scale.double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return weight.double() * full[:weight.shape[0], :weight.shape[1]]


@pytest.mark.parametrize("group", [None, 16])
def test_quant_fp8_per_token_and_per_group(group):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 48, generator=gen) * torch.logspace(-3, 2, 5)[:, None]).to(DEVICE)
    x[3] = 0  # a row of zeros stays zeros
    q, scales = quant_fp8(x, group)
    groups = 1 if group is None else 3
    assert q.dtype == FP8_DTYPE and scales.shape == (5, groups) and scales.dtype == torch.float32
    full = scales.repeat_interleave(48 // groups, 1)
    assert (q.float().abs().amax(1)[[0, 1, 2, 4]] == FP8_MAX).all() or group is not None
    assert torch.equal(q[3].float(), torch.zeros(48, device=DEVICE))
    # e4m3 keeps 3 mantissa bits: every value within half a step of the original, 1/16 relative, or 2^-10 of
    # the scale among the subnormals
    error = (q.double() * full.double() - x.double()).abs()
    assert (error <= x.double().abs() / 16 + full.double() * 2**-10 + 1e-12).all()
    # the same numbers torch's own conversion (round to nearest even) gives
    expected = (x.float() / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert torch.equal(q.float(), expected.float())


@pytest.mark.parametrize("m, n, k, block", [(3, 40, 64, (16, 32)), (20, 33, 70, (32, 32))])
@pytest.mark.parametrize("bias", [False, True])
def test_block_fp8_matmul_matches_float64(m, n, k, block, bias):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    weight, w_scale = block_scaled(n, k, block, gen)
    b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    q, x_scale = quant_fp8(x, block[1])
    got = block_fp8_matmul(q, x_scale, weight, w_scale, block, torch.float32, b)
    x_deq = q.double() * x_scale.double().repeat_interleave(block[1], 1)[:, :k]
    ref = x_deq @ dequant_blocks(weight, w_scale, block).T + (b.double() if bias else 0)
    # float32 accumulation under the interpreter; Hopper's FP8 MMA keeps fewer accumulator bits (about 5e-5 here)
    assert got.shape == (m, n) and rel_err(got, ref) < (2e-4 if DEVICE == "cuda" else 1e-5)


@pytest.mark.parametrize("n, k, block", [(37, 96, None), (40, 64, (16, 32))])
def test_fp8_gemv_matches_float64(n, k, block):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(DEVICE)
    if block is None:
        weight = (torch.randn(n, k, generator=gen) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(DEVICE)
        scale = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(DEVICE)
        ref_w = weight.double() * scale.double()[:, None]
    else:
        weight, scale = block_scaled(n, k, block, gen)
        ref_w = dequant_blocks(weight, scale, block)
    bias = torch.randn(n, generator=gen).to(DEVICE)
    got = fp8_gemv(x, weight, scale, bias, block_size=block, block_n=8)
    assert got.shape == (1, n) and rel_err(got, x.double() @ ref_w.T + bias.double()) < 1e-5


@pytest.mark.parametrize("m", [2, 16, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_small_m_matches_float64(m, bias):
    """Up to 16 rows the activations go to the tensor cores as fp16; above, quantized per token (quant_fp8's,
    which the reference dequantizes). N = 200 leaves a partial tile; N = 6144 takes the wide one."""
    gen = torch.Generator().manual_seed(m)
    for n in (200, 6144) if DEVICE == "cuda" else (200,):
        x = torch.randn(m, 512, generator=gen).to(DEVICE)
        weight = (torch.randn(n, 512, generator=gen) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(DEVICE)
        scale = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(DEVICE)
        b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
        got = fp8_small_m(x, weight, scale, b)
        if m > 16:
            q, x_scale = quant_fp8(x)
            x_ref = q.double() * x_scale.double()
        else:
            x_ref = x.half().double()
        ref = x_ref @ (weight.double() * scale.double()[:, None]).T + (b.double() if bias else 0)
        assert got.shape == (m, n) and got.dtype == x.dtype
        # Hopper's FP8 MMA accumulates with fewer bits than float32 (3e-4 measured on the H100)
        assert rel_err(got, ref) < ((1e-3 if m > 16 else 2e-4) if DEVICE == "cuda" else 1e-5)


def test_fp8_small_m_refuses_what_it_cannot_take():
    weight = torch.zeros(8, 96, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="K a multiple of 512"):
        fp8_small_m(torch.zeros(4, 96), weight, torch.ones(8))
