"""The fused GPU kernels against the PyTorch code they replace (CPU: Triton interpreter, tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.layernorm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.layers.triton_ops import gemv, qk_norm_rope_inplace, rms_norm, sample_from_logits, silu_and_mul

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
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(1, 1, 32), (4, 2, 32), (20, 4, 64), (3, 1, 48)])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("write_kv", [False, True])
def test_qk_norm_rope_in_place_matches_rmsnorm_then_rotary(dtype, heads, kv_heads, head_dim, qk_norm, write_kv):
    torch.manual_seed(2)
    rope = RotaryEmbedding(head_dim, 64, 10000.0).to(DEVICE)
    tokens = 6
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width + 8, device=DEVICE, dtype=dtype)[:, :width]  # rows strided
    positions = torch.tensor([0, 1, 5, 17, 63, 2], device=DEVICE)
    q = qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    weights = ()
    if qk_norm:
        q_norm, k_norm = RMSNorm(head_dim, 1e-6).to(DEVICE), RMSNorm(head_dim, 1e-6).to(DEVICE)
        q_norm.weight.data = torch.randn(head_dim, device=DEVICE).to(dtype)
        k_norm.weight.data = torch.randn(head_dim, device=DEVICE).to(dtype)
        q, k = q_norm._norm(q), k_norm._norm(k)
        weights = (q_norm.weight, k_norm.weight, 1e-6)
    expected_q, expected_k = rope(positions, q, k)
    values = qkv[:, (heads + kv_heads) * head_dim:].clone()
    cache = {}
    if write_kv:  # [2, blocks, block_size, kv_heads, head_dim]; token 3 is padding (slot -1)
        cache = dict(kv_cache=torch.full((2, 5, 4, kv_heads, head_dim), 7.0, device=DEVICE, dtype=dtype),
                     slot_mapping=torch.tensor([9, 0, 19, -1, 4, 10], device=DEVICE))
    if not qk_norm:
        weights = (None, None, 1e-6)
    qk_norm_rope_inplace(qkv, positions, rope.cos_cache, rope.sin_cache, heads, kv_heads, head_dim, *weights, **cache)
    close(qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim), expected_q, dtype)
    keys = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    close(keys, expected_k, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], values)
    if write_kv:  # exactly the rotated keys and the values, in their slots and nowhere else
        expected_cache = torch.full_like(cache["kv_cache"], 7.0)
        slots = cache["slot_mapping"]
        real = slots >= 0
        expected_cache[0].view(20, kv_heads, head_dim)[slots[real]] = keys[real]
        expected_cache[1].view(20, kv_heads, head_dim)[slots[real]] = values.reshape(tokens, kv_heads, head_dim)[real]
        assert torch.equal(cache["kv_cache"], expected_cache)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_writes_an_fp8_cache_over_its_scales(dtype):
    """The same kernel into an e4m3 cache: each key over k_scale and each value over v_scale, rounded as torch's
    own conversion rounds them."""
    torch.manual_seed(4)
    heads, kv_heads, head_dim, tokens = 4, 2, 32, 5
    rope = RotaryEmbedding(head_dim, 64, 10000.0).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype) * 4
    values = qkv[:, (heads + kv_heads) * head_dim:].reshape(tokens, kv_heads, head_dim).clone()
    positions = torch.tensor([3, 1, 8, 0, 2], device=DEVICE)
    cache = torch.zeros((2, 3, 4, kv_heads, head_dim), device=DEVICE, dtype=torch.float8_e4m3fn)
    slots = torch.tensor([5, -1, 0, 11, 7], device=DEVICE)
    qk_norm_rope_inplace(qkv, positions, rope.cos_cache, rope.sin_cache, heads, kv_heads, head_dim, kv_cache=cache,
                         slot_mapping=slots, k_scale=0.05, v_scale=0.01)
    keys = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    flat = cache.view(2, 12, kv_heads, head_dim)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k = (keys[t].float() / 0.05).clamp(-448, 448).to(torch.float8_e4m3fn)
            expected_v = (values[t].float() / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert torch.equal(flat[0, slot].float(), expected_k.float())
            assert torch.equal(flat[1, slot].float(), expected_v.float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_kernel_greedy_rows_take_the_argmax(dtype):
    torch.manual_seed(3)
    logits = torch.randn(6, 2500, device=DEVICE).to(dtype)  # splits of 4 x 256 columns: three
    logits[1, 7] = logits[1, 2400] = 50.0  # a tie goes to the lower id
    logits[2] = float("-inf")
    logits[2, 1500] = 0.0
    temperature = torch.zeros(6, device=DEVICE)
    expected = logits.float().argmax(dim=-1)
    assert sample_from_logits(logits, temperature, seed=5, block=256).tolist() == expected.tolist()
    assert expected[1] == 7


def test_sampling_kernel_draws_from_softmax_over_temperature():
    """Frequencies over independent rows match softmax(logits / T); greedy rows in the same batch stay
    greedy. The likely tokens sit in four of five 64-column splits, the middle one all but empty, so the
    second pass must find the right split and then the right column in it. (The interpreter is slow, so
    the sample is small: 4 standard errors are 0.14, while T = 1 instead of 0.5 would move the top
    token's share by 0.18 and T = 2 by 0.31.)"""
    rows, vocab = 200, 300
    hot = torch.tensor([5, 110, 207, 290])
    row_logits = torch.full((vocab,), -30.0)
    row_logits[hot] = torch.tensor([0.0, 1.5, -1.0, 1.0])
    row_logits[3] = float("-inf")
    row_logits[128:192] = float("-inf")
    logits = row_logits.repeat(rows, 1).to(DEVICE)
    temperature = torch.full((rows,), 0.5, device=DEVICE)
    temperature[::50] = 0.0
    sampled = sample_from_logits(logits, temperature, seed=1234, block=16).cpu()
    greedy = torch.arange(rows) % 50 == 0
    assert (sampled[greedy] == 110).all()
    drawn = sampled[~greedy]
    expected = torch.softmax(row_logits / 0.5, dim=-1)[hot]
    observed = torch.stack([(drawn == t).float().mean() for t in hot])
    assert observed.sum() == 1.0  # nothing outside the likely tokens (their share is < 1e-12 together)
    assert torch.allclose(observed, expected, atol=4 * (0.25 / len(drawn)) ** 0.5), (observed, expected)
    few = slice(1, 21)
    assert not torch.equal(sample_from_logits(logits[few], temperature[few], seed=99, block=16).cpu(), sampled[few])


def test_sampling_kernel_keeps_to_a_grammar_bitmask():
    """Rows masked by a packed bitmask (vocab not a multiple of 32, allowed sets across several splits):
    greedy rows take the argmax of the reference-masked logits, sampled rows draw only allowed tokens, an
    all-ones row is unconstrained."""
    torch.manual_seed(4)
    rows, vocab = 6, 2500
    logits = torch.randn(rows, vocab, device=DEVICE)
    allowed = torch.rand(rows, vocab) < 0.05
    allowed[0] = True
    allowed[1] = False
    allowed[1, [3, 1999, 2499]] = True  # the global argmax is very likely elsewhere
    words = torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int64)
    for bit in range(32):
        column = torch.arange(bit, words.shape[1] * 32, 32)
        present = column < vocab
        words[:, present] |= allowed[:, column[present]].long() << bit
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(DEVICE)
    reference = logits.cpu().masked_fill(~allowed, float("-inf"))
    greedy = torch.zeros(rows, device=DEVICE)
    assert sample_from_logits(logits, greedy, seed=5, bitmask=bitmask).tolist() == reference.argmax(-1).tolist()
    for seed in range(4):
        drawn = sample_from_logits(logits, torch.ones(rows, device=DEVICE), seed=seed, block=256,
                                   bitmask=bitmask).cpu()
        assert allowed[torch.arange(rows), drawn].all()
    with pytest.raises(ValueError, match="bitmask"):
        sample_from_logits(logits, greedy, seed=5, bitmask=bitmask[:, :-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,bias", [(37, 96, True), (64, 256, False), (5, 200, True)])
def test_gemv_matches_float64(dtype, n, k, bias):
    """Batch-1 GEMV (rows past N, a K that is not a multiple of the tile) against a float64 product."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    got = gemv(x, w, b, block_n=8, block_k=64)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (1, n) and got.dtype == dtype
    # float32 accumulation; the bf16 result is one rounding of it
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol
