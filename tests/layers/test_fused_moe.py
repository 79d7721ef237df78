"""The MoE experts (the Triton grouped GEMM on the GPU or under the interpreter, the CPU loop) against a
float64 loop over each token's experts, at tiny sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.layers.fused_moe import FusedMoE, select_experts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_EXPERTS, HIDDEN, INTERMEDIATE = 8, 48, 40  # neither a multiple of the kernel's 64-wide tiles


def reference(x, w13, w2, topk_weights, topk_ids, biases=None) -> torch.Tensor:
    """Each token through each of its experts, in float64; with biases (b13 [E, 2I], b2 [E, H]), GPT-OSS's
    expert: biased projections and the clamped SwiGLU, written out from its definition."""
    x, w13, w2, topk_weights = (t.double().cpu() for t in (x, w13, w2, topk_weights))
    out = torch.zeros_like(x)
    for token, (weights, ids) in enumerate(zip(topk_weights, topk_ids.tolist())):
        for weight, expert in zip(weights, ids):
            if biases is None:
                gate, up = (w13[expert] @ x[token]).chunk(2)
                out[token] += weight * (w2[expert] @ (F.silu(gate) * up))
                continue
            b13, b2 = (b.double().cpu()[expert] for b in biases)
            gate, up = (w13[expert] @ x[token] + b13).chunk(2)
            gate, up = torch.minimum(gate, torch.tensor(7.0)), up.clamp(-7.0, 7.0)
            hidden = (up + 1) * gate / (1 + torch.exp(-1.702 * gate))
            out[token] += weight * (w2[expert] @ hidden + b2)
    return out


def random_experts(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN ** 0.5
    w2 = torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE ** 0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_tokens", [1, 5, 17, 40])
def test_grouped_gemm_kernel_matches_float64_loop(num_tokens, top_k, dtype):
    """Blocks of 16 rows: 5, 17 and 40 tokens leave partial blocks; with 1 or 5 tokens most experts get none."""
    from tokenmill.layers.fused_moe_triton import fused_experts

    w13, w2 = random_experts(dtype, seed=num_tokens)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    router_logits = torch.randn(num_tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    topk_weights, topk_ids = select_experts(router_logits, top_k, renormalize=top_k > 1)
    out = fused_experts(x, w13, w2, topk_weights, topk_ids, block_m=16)
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double().cpu(), reference(x, w13, w2, topk_weights, topk_ids),
                               rtol=tolerance, atol=tolerance)


def test_alignment_gives_each_block_one_expert_and_each_pair_one_row():
    from tokenmill.layers.fused_moe_triton import moe_align_block_size

    topk_ids = torch.tensor([[3, 0], [3, 5], [0, 3], [7, 3], [3, 1]], device=DEVICE)
    sorted_pair_ids, block_expert_ids, num_rows_padded = moe_align_block_size(topk_ids, 4, NUM_EXPERTS)
    # experts 0, 1, 3, 5, 7 hold 2, 1, 5, 1, 1 pairs: 1 + 1 + 2 + 1 + 1 blocks of 4 rows
    assert num_rows_padded.item() == 24 and sorted_pair_ids.numel() % 4 == 0
    used = sorted_pair_ids[:24].view(6, 4).cpu()
    assert block_expert_ids[:6].tolist() == [0, 1, 3, 3, 5, 7]
    assert used.tolist() == [[1, 4, 10, 10], [9, 10, 10, 10], [0, 2, 5, 7], [8, 10, 10, 10], [3, 10, 10, 10],
                             [6, 10, 10, 10]]
    assert (sorted_pair_ids[24:] == 10).all()


@pytest.mark.parametrize("renormalize", [False, True])
def test_layer_routes_as_hf_on_the_cpu(renormalize):
    """FusedMoE on the CPU: softmax in float32, top-2, renormalized (Mixtral, Qwen3-MoE's norm_topk_prob) or not."""
    layer = FusedMoE(NUM_EXPERTS, 2, HIDDEN, INTERMEDIATE, renormalize)
    layer.w13_weight.data, layer.w2_weight.data = (w.cpu() for w in random_experts(torch.float32, seed=3))
    x = torch.randn(9, HIDDEN)
    router_logits = torch.randn(9, NUM_EXPERTS)
    probs = router_logits.double().softmax(-1)
    weights, ids = probs.topk(2, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    expected = reference(x, layer.w13_weight, layer.w2_weight, weights, ids)
    torch.testing.assert_close(layer(x, router_logits).double(), expected, rtol=1e-5, atol=1e-6)


def gpt_oss_experts(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Experts whose gate/up outputs reach past the clamps at +-7 (weights 6x the usual scale), with biases."""
    w13, w2 = random_experts(dtype, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    b13 = torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, generator=generator)
    b2 = torch.randn(NUM_EXPERTS, HIDDEN, generator=generator)
    return (w13 * 6).to(dtype), w2, b13.to(DEVICE, dtype), b2.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 17])
def test_biases_and_clamped_swiglu_match_float64_loop(num_tokens, dtype):
    """GPT-OSS's experts: the grouped GEMM with bias rows and the swigluoai activation, and the CPU loop."""
    from tokenmill.layers.fused_moe import experts_loop
    from tokenmill.layers.fused_moe_triton import fused_experts

    w13, w2, b13, b2 = gpt_oss_experts(dtype, seed=num_tokens)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    router_logits = torch.randn(num_tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    topk_weights, topk_ids = select_experts(router_logits, 4, renormalize=True)
    expected = reference(x, w13, w2, topk_weights, topk_ids, biases=(b13, b2))
    gate_up = torch.stack([w13[e].double().cpu() @ x.double().cpu().T for e in range(NUM_EXPERTS)])
    assert (gate_up.abs() > 7).float().mean() > 0.05  # the clamps matter
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    out = fused_experts(x, w13, w2, topk_weights, topk_ids, block_m=16, w13_bias=b13, w2_bias=b2,
                        activation="swigluoai")
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:
        cpu = (t.cpu() for t in (x, w13, w2, topk_weights, topk_ids, b13, b2))
        torch.testing.assert_close(experts_loop(*cpu, activation="swigluoai").double(), expected, rtol=1e-5,
                                   atol=1e-5)
