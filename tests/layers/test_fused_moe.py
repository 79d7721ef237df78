"""The MoE experts (the Triton grouped GEMM on the GPU or under the interpreter, the CPU loop) against a
float64 loop over each token's experts, at tiny sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.layers.fused_moe import FusedMoE, select_experts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_EXPERTS, HIDDEN, INTERMEDIATE = 8, 48, 40  # neither a multiple of the kernel's 64-wide tiles


def reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Each token through each of its experts, in float64."""
    x, w13, w2, topk_weights = (t.double().cpu() for t in (x, w13, w2, topk_weights))
    out = torch.zeros_like(x)
    for token, (weights, ids) in enumerate(zip(topk_weights, topk_ids.tolist())):
        for weight, expert in zip(weights, ids):
            gate, up = (w13[expert] @ x[token]).chunk(2)
            out[token] += weight * (w2[expert] @ (F.silu(gate) * up))
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


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_deepseek_routing_matches_hf_routers(version):
    """Group-limited top-k (V2: softmax, a group's best score; V3: sigmoid plus the correction bias, a group's
    best two) and routed_scaling_factor, against HF's router modules on the same weights."""
    import transformers
    from transformers.models.deepseek_v2 import modeling_deepseek_v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    common = dict(hidden_size=HIDDEN, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                  topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=version == "v3")
    torch.manual_seed(0)
    if version == "v2":
        router = modeling_deepseek_v2.DeepseekV2TopkRouter(
            transformers.DeepseekV2Config(**common, topk_method="group_limited_greedy"))
        bias, routing = None, dict(scoring_func="softmax")
    else:
        router = modeling_deepseek_v3.DeepseekV3TopkRouter(transformers.DeepseekV3Config(**common))
        router.e_score_correction_bias.uniform_(-0.5, 0.5)
        bias, routing = router.e_score_correction_bias, dict(scoring_func="sigmoid")
    router.weight.data.normal_()
    x = torch.randn(64, HIDDEN)
    _, hf_weights, hf_ids = router(x)
    weights, ids = select_experts(x @ router.weight.T, 3, version == "v3", num_expert_group=4, topk_group=2,
                                  e_score_correction_bias=bias, routed_scaling_factor=2.5, **routing)
    hf_order, order = hf_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order))
