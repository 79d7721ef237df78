"""The fused GPU kernels against the PyTorch code they replace (CPU: Triton interpreter, tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.layernorm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.layers.triton_ops import rms_norm, rotary_inplace, silu_and_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    torch.manual_seed(0)
    norm = RMSNorm(hidden, eps=1e-5).to(DEVICE)
    norm.weight.data = torch.randn(hidden, device=DEVICE)
    norm = norm.to(dtype)
    x = torch.randn(7, hidden, device=DEVICE, dtype=dtype)
    residual = torch.randn(7, hidden, device=DEVICE, dtype=dtype)
    ref_out, ref_res = norm._norm(x + residual), x + residual
    res = residual.clone()
    out = rms_norm(x, norm.weight, 1e-5, res)
    close(out, ref_out, dtype)
    close(res, ref_res, dtype)
    close(rms_norm(x, norm.weight, 1e-5), norm._norm(x), dtype)
    strided = torch.randn(7, 2 * hidden, device=DEVICE, dtype=dtype)[:, :hidden]  # rows not contiguous
    close(rms_norm(strided, norm.weight, 1e-5), norm._norm(strided), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    torch.manual_seed(1)
    x = torch.randn(5, 2 * 1100, device=DEVICE, dtype=dtype)  # more than one column block
    gate, up = x.float().chunk(2, dim=-1)
    close(silu_and_mul(x), (torch.nn.functional.silu(gate) * up).to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [1, 4, 20])
def test_rotary_in_place_on_strided_views(dtype, heads):
    torch.manual_seed(2)
    head_dim = 32
    rope = RotaryEmbedding(head_dim, 64, 10000.0).to(DEVICE)
    qkv = torch.randn(6, (heads + 2) * head_dim, device=DEVICE, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(6, heads, head_dim)
    positions = torch.tensor([0, 1, 5, 17, 63, 2], device=DEVICE)
    cos = rope.cos_cache[positions].unsqueeze(1).to(dtype)
    sin = rope.sin_cache[positions].unsqueeze(1).to(dtype)
    x1, x2 = q.chunk(2, dim=-1)
    expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    untouched = qkv[:, heads * head_dim:].clone()
    rotary_inplace(q, positions, rope.cos_cache, rope.sin_cache)
    close(q, expected, dtype)
    assert torch.equal(qkv[:, heads * head_dim:], untouched)
