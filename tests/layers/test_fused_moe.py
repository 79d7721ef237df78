"""The MoE experts (the Triton grouped GEMM on the GPU or under the interpreter, the CPU loop) against a
float64 loop over each token's experts, at tiny sizes."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tokenmill.distributed.parallel_state import destroy_distributed, init_distributed
from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX
from tokenmill.layers.fused_moe import FusedMoE, select_experts
from tokenmill.layers.fused_moe_triton import _e2m1_values

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


def sixteen_row_blocks():
    from tokenmill.layers.fused_moe_triton import GemmConfig

    return GemmConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)


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
    out = fused_experts(x, w13, w2, topk_weights, topk_ids, config=sixteen_row_blocks())
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double().cpu(), reference(x, w13, w2, topk_weights, topk_ids),
                               rtol=tolerance, atol=tolerance)


def test_a_long_prompts_step_takes_128_row_tiles_and_matches_float64_loop():
    """From 128 rows an expert on, the default tiles are 128 x 128 (8 warps): 530 tokens x 2 over the experts,
    the last blocks partial."""
    from tokenmill.layers.fused_moe_triton import fused_experts, gemm_config

    num_tokens, top_k = 64 * NUM_EXPERTS + 18, 2
    assert gemm_config(num_tokens, NUM_EXPERTS, top_k).block_m == 128
    w13, w2 = random_experts(torch.float16, seed=3)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.float16)
    router_logits = torch.randn(num_tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    topk_weights, topk_ids = select_experts(router_logits, top_k, renormalize=True)
    out = fused_experts(x, w13, w2, topk_weights, topk_ids)
    torch.testing.assert_close(out.double().cpu(), reference(x, w13, w2, topk_weights, topk_ids), rtol=1e-2,
                               atol=1e-2)


@pytest.mark.parametrize("top_k, renormalize, scale", [(1, False, 1.0), (2, True, 1.0), (6, False, 1.0),
                                                        (8, True, 2.5)])
def test_softmax_topk_kernel_routes_as_select_experts(top_k, renormalize, scale):
    """The one-launch softmax routing against select_experts' torch ops (on the CPU, where it takes them): the
    same experts, weights within float32."""
    from tokenmill.layers.fused_moe_triton import softmax_topk

    num_experts = 20  # no power of two
    logits = torch.randn(7, num_experts, generator=torch.Generator().manual_seed(top_k)).to(DEVICE, torch.float16)
    weights, ids = softmax_topk(logits, top_k, renormalize, scale)
    expected_weights, expected_ids = select_experts(logits.cpu(), top_k, renormalize, routed_scaling_factor=scale)
    assert ids.dtype == torch.int64 and ids.tolist() == expected_ids.tolist()
    torch.testing.assert_close(weights.cpu(), expected_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_tokens, top_k, num_experts, block_m", [(1, 8, 128, 16), (130, 8, 128, 16),
                                                                     (300, 6, 64, 64), (50, 4, 32, 64)])
def test_alignment_invariants_in_one_program_and_in_four(num_tokens, top_k, num_experts, block_m):
    """Up to 1,024 pairs one program sorts them, above four launches: either way each pair has one row in a block
    of its expert, blocks come in expert order, and pairs held elsewhere (id E) follow the padded blocks (rows
    past those are left unwritten)."""
    from tokenmill.layers.fused_moe_triton import moe_align_block_size

    generator = torch.Generator().manual_seed(num_tokens)
    topk_ids = torch.stack([torch.randperm(num_experts + 1, generator=generator)[:top_k] for _ in range(num_tokens)])
    sorted_pair_ids, block_expert_ids, num_rows_padded = moe_align_block_size(topk_ids.to(DEVICE), block_m,
                                                                              num_experts)
    flat, sorted_pair_ids, block_expert_ids = topk_ids.flatten(), sorted_pair_ids.cpu(), block_expert_ids.cpu()
    num_pairs, used = flat.numel(), int(num_rows_padded.item())
    elsewhere = int((flat == num_experts).sum())
    written = sorted_pair_ids[:used + elsewhere]  # later rows are never read
    assert sorted(p for p in written.tolist() if p < num_pairs) == list(range(num_pairs))
    for block in range(used // block_m):
        rows = sorted_pair_ids[block * block_m:(block + 1) * block_m]
        assert (flat[rows[rows < num_pairs].long()] == block_expert_ids[block]).all()
    assert block_expert_ids[:used // block_m].tolist() == sorted(block_expert_ids[:used // block_m].tolist())
    assert (flat[written[used:].long()] == num_experts).all()


def test_alignment_gives_each_block_one_expert_and_each_pair_one_row():
    from tokenmill.layers.fused_moe_triton import moe_align_block_size

    topk_ids = torch.tensor([[3, 0], [3, 5], [0, 3], [7, 3], [3, 1]], device=DEVICE)
    sorted_pair_ids, block_expert_ids, num_rows_padded = moe_align_block_size(topk_ids, 4, NUM_EXPERTS)
    # experts 0, 1, 3, 5, 7 hold 2, 1, 5, 1, 1 pairs: 1 + 1 + 2 + 1 + 1 blocks of 4 rows
    assert num_rows_padded.item() == 24 and sorted_pair_ids.numel() % 4 == 0
    used = sorted_pair_ids[:24].view(6, 4).cpu()
    assert block_expert_ids[:6].tolist() == [0, 1, 3, 3, 5, 7]
    assert used.sort(dim=1).values.tolist() == [[1, 4, 10, 10], [9, 10, 10, 10], [0, 2, 5, 7], [8, 10, 10, 10],
                                                [3, 10, 10, 10], [6, 10, 10, 10]]


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
    out = fused_experts(x, w13, w2, topk_weights, topk_ids, config=sixteen_row_blocks(), w13_bias=b13, w2_bias=b2,
                        activation="swigluoai")
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:
        cpu = (t.cpu() for t in (x, w13, w2, topk_weights, topk_ids, b13, b2))
        torch.testing.assert_close(experts_loop(*cpu, activation="swigluoai").double(), expected, rtol=1e-5,
                                   atol=1e-5)


@triton.jit
def _decode_e2m1(codes_ptr, out_ptr):
    i = tl.arange(0, 16)
    tl.store(out_ptr + i, _e2m1_values(tl.load(codes_ptr + i), out_ptr.dtype.element_ty))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_e2m1_codes_become_their_values_bit_by_bit(dtype):
    """The grouped GEMM's e2m1 decoding (built from bits in the activations' dtype) against the format's table."""
    from tokenmill.layers.quantization.mxfp4 import E2M1_VALUES

    out = torch.empty(16, dtype=dtype, device=DEVICE)
    _decode_e2m1[(1,)](torch.arange(16, dtype=torch.int32, device=DEVICE), out)
    assert out.tolist() == list(E2M1_VALUES)
    assert torch.signbit(out[8]).item()  # -0.0


MX_HIDDEN, MX_INTERMEDIATE = 96, 32  # MXFP4 blocks are 32 wide; 96 is no multiple of the 64-wide tiles


def mxfp4_experts(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 experts [E, rows, cols] in the layout FusedMoE keeps: codes uint8 [E, rows, cols / 2] (every
    code), exponents [E, rows, cols / 32] around 2^-3."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (NUM_EXPERTS, rows, cols // 2), dtype=torch.uint8, generator=generator)
    exponents = torch.randint(122, 126, (NUM_EXPERTS, rows, cols // 32), dtype=torch.uint8, generator=generator)
    return codes.to(DEVICE), exponents.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 17])
def test_mxfp4_experts_match_float64_of_their_values(num_tokens, dtype):
    """The grouped GEMM reading MXFP4 codes and exponents (GPT-OSS's experts: biases, the clamped SwiGLU) against
    the float64 experts of the values the format defines (dequantize_mxfp4 is itself checked element by element
    in tests/models/test_gpt_oss.py)."""
    from tokenmill.layers.fused_moe_triton import fused_experts
    from tokenmill.layers.quantization.mxfp4 import dequantize_mxfp4

    (c13, e13), (c2, e2) = mxfp4_experts(2 * MX_INTERMEDIATE, MX_HIDDEN, num_tokens), \
        mxfp4_experts(MX_HIDDEN, MX_INTERMEDIATE, num_tokens + 50)
    w13, w2 = (dequantize_mxfp4(c.unflatten(-1, (-1, 16)), e, torch.float64) for c, e in ((c13, e13), (c2, e2)))
    generator = torch.Generator().manual_seed(num_tokens + 100)
    b13, b2 = (torch.randn(NUM_EXPERTS, n, generator=generator).to(DEVICE, dtype)
               for n in (2 * MX_INTERMEDIATE, MX_HIDDEN))
    x = torch.randn(num_tokens, MX_HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    router_logits = torch.randn(num_tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    topk_weights, topk_ids = select_experts(router_logits, 4, renormalize=True)
    expected = reference(x, w13, w2, topk_weights, topk_ids, biases=(b13, b2))
    out = fused_experts(x, c13, c2, topk_weights, topk_ids, config=sixteen_row_blocks(), w13_bias=b13, w2_bias=b2,
                        activation="swigluoai", w13_mxfp4_scales=e13, w2_mxfp4_scales=e2)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance)


def held_by_rank(topk_ids: torch.Tensor, rank: int, num_local: int) -> torch.Tensor:
    """Expert ids as rank `rank` of an expert-parallel group sees them: its own 0 .. num_local - 1, the others
    num_local (held elsewhere)."""
    return torch.where(topk_ids // num_local == rank, topk_ids % num_local, num_local)


@pytest.mark.parametrize("implementation", ["grouped_gemm", "cpu_loop"])
@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel_ranks_outputs_sum_to_the_whole_layer(ep_size, implementation):
    """Each rank's experts over the pairs it holds (the rest marked held elsewhere); summed over the ranks, as
    the all-reduce combines them, they are the whole layer. 3 tokens leave some rank with no pair at all."""
    from tokenmill.layers.fused_moe import experts_loop
    from tokenmill.layers.fused_moe_triton import fused_experts

    def grouped_gemm(*args) -> torch.Tensor:
        return fused_experts(*args, config=sixteen_row_blocks(), some_held_elsewhere=True)

    experts, device = (grouped_gemm, DEVICE) if implementation == "grouped_gemm" else (experts_loop, "cpu")
    w13, w2 = (w.to(device) for w in random_experts(torch.float32, seed=ep_size))
    num_local = NUM_EXPERTS // ep_size
    for num_tokens in (3, 21):
        x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(4)).to(device)
        router_logits = torch.randn(num_tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(5)).to(device)
        topk_weights, topk_ids = select_experts(router_logits, 2, renormalize=True)
        out = sum(experts(x, w13[r * num_local:(r + 1) * num_local], w2[r * num_local:(r + 1) * num_local],
                          topk_weights, held_by_rank(topk_ids, r, num_local)).double().cpu()
                  for r in range(ep_size))
        torch.testing.assert_close(out, reference(x, w13, w2, topk_weights, topk_ids), rtol=1e-5, atol=1e-5)


def layer_inputs() -> tuple[torch.Tensor, ...]:
    """Float64 experts (w13 [E, 2I, H], w2 [E, H, I]), x [T, H] and router logits [T, E], the same on every rank."""
    w13, w2 = (w.cpu().double() for w in random_experts(torch.float32, seed=7))
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(13, HIDDEN, generator=generator, dtype=torch.float64)
    return w13, w2, x, torch.randn(13, NUM_EXPERTS, generator=generator, dtype=torch.float64)


def _expert_parallel_rank(rank: int, init_method: str, out_path: str) -> None:
    """One of two gloo ranks with expert parallelism: loads every checkpoint expert through the layer's
    weight_loader (it keeps its own), runs the layer, saves its weights and output."""
    init_distributed(rank, 2, 2, init_method, "gloo", 60, enable_expert_parallel=True)
    try:
        w13, w2, x, router_logits = layer_inputs()
        torch.set_default_dtype(torch.float64)
        layer = FusedMoE(NUM_EXPERTS, 2, HIDDEN, INTERMEDIATE, renormalize=False, prefix="moe")
        for expert_id in range(NUM_EXPERTS):
            gate, up = w13[expert_id].chunk(2)
            layer.weight_loader(layer.w13_weight, gate, "w1", expert_id)
            layer.weight_loader(layer.w13_weight, up, "w3", expert_id)
            layer.weight_loader(layer.w2_weight, w2[expert_id], "w2", expert_id)
        torch.save({"w13": layer.w13_weight.data, "w2": layer.w2_weight.data, "out": layer(x, router_logits)},
                   out_path)
    finally:
        destroy_distributed()


def test_expert_parallel_layer_over_two_gloo_ranks_matches_float64_reference(tmp_path):
    """Rank r holds experts [4r, 4r + 4) whole; its share of every token's pairs, all-reduced, is the layer."""
    context = multiprocessing.get_context("spawn")
    init_method = f"file://{tmp_path / 'rendezvous'}"
    procs = [context.Process(target=_expert_parallel_rank, args=(rank, init_method, str(tmp_path / f"{rank}.pt")))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    w13, w2, x, router_logits = layer_inputs()
    expected = reference(x, w13, w2, *select_experts(router_logits, 2, renormalize=False))  # float32 weights
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt")
        held = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(saved["w13"], w13[held]) and torch.equal(saved["w2"], w2[held])
        torch.testing.assert_close(saved["out"], expected, rtol=1e-12, atol=1e-12)


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
def quantize_experts(w: torch.Tensor, block: tuple[int, int] | None, segment_rows: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts [E, N, K] in e4m3 as checkpoints ship them -> (e4m3, scales, the float64 dequantized experts).
    block None: one scale per row, [E, N]; else one per block of each segment of segment_rows rows (w13's
    gate and up), the last blocks of a segment or a row partial."""
    if block is None:
        scale = w.abs().amax(-1) / FP8_MAX
        q = (w / scale[..., None]).to(FP8_DTYPE)
        return q, scale, q.double() * scale.double()[..., None]
    q, deq, scales = torch.empty(w.shape, dtype=FP8_DTYPE), torch.empty(w.shape, dtype=torch.float64), []
    for expert in range(w.shape[0]):
        rows_of_blocks = []
        for r0 in [s + r for s in range(0, w.shape[1], segment_rows) for r in range(0, segment_rows, block[0])]:
            r1, row_scales = min(r0 + block[0], (r0 // segment_rows + 1) * segment_rows), []
            for c0 in range(0, w.shape[2], block[1]):
                tile = w[expert, r0:r1, c0:c0 + block[1]]
                scale = tile.abs().amax() / FP8_MAX
                q[expert, r0:r1, c0:c0 + block[1]] = (tile / scale).to(FP8_DTYPE)
                deq[expert, r0:r1, c0:c0 + block[1]] = q[expert, r0:r1, c0:c0 + block[1]].double() * scale.double()
                row_scales.append(scale)
            rows_of_blocks.append(torch.stack(row_scales))
        scales.append(torch.stack(rows_of_blocks))
    return q, torch.stack(scales), deq


def quantize_activations(x: torch.Tensor, group: int | None, static_scale: float | None) -> torch.Tensor:
    """x [K] float64 -> its e4m3 rounding per group of `group` values (None: one scale), or with a static scale."""
    if static_scale is not None:
        return (x / static_scale).clamp(-FP8_MAX, FP8_MAX).float().to(FP8_DTYPE).double() * static_scale
    out = torch.empty_like(x)
    for start in range(0, x.numel(), group or x.numel()):
        part = x[start:start + (group or x.numel())]
        scale = part.abs().max() / FP8_MAX
        out[start:start + part.numel()] = (part / scale).float().to(FP8_DTYPE).double() * scale
    return out


def fp8_reference(x, w13, w2, topk_weights, topk_ids, group, static_scale=None) -> torch.Tensor:
    """Each token through each of its dequantized experts in float64, the activations rounded to e4m3 before
    each projection as the FP8 path quantizes them."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for token, (weights, ids) in enumerate(zip(topk_weights.double().cpu(), topk_ids.tolist())):
        xq = quantize_activations(x[token].double().cpu(), group, static_scale)
        for weight, expert in zip(weights, ids):
            gate, up = (w13[expert] @ xq).chunk(2)
            hidden = quantize_activations(F.silu(gate) * up, group, static_scale)
            out[token] += weight * (w2[expert] @ hidden)
    return out


@pytest.mark.parametrize("scheme", ["block", "channel", "channel_static"])
@pytest.mark.parametrize("num_tokens", [5, 17])
def test_fp8_grouped_gemm_matches_float64_loop_on_dequantized_experts(scheme, num_tokens):
    """Block scales of 16 x 32 over I = 40, H = 48: the gate's and up's last rows of blocks are partial (each
    half has its own), and so are the last column blocks; per channel with per-token or static activations."""
    from tokenmill.layers.fused_moe_triton import Fp8ExpertWeights, fused_experts

    block = (16, 32) if scheme == "block" else None
    static_scale = 0.02 if scheme == "channel_static" else None
    w13, w2 = (w.cpu() for w in random_experts(torch.float32, seed=num_tokens))
    q13, scale13, deq13 = quantize_experts(w13, block, INTERMEDIATE)
    q2, scale2, deq2 = quantize_experts(w2, block, HIDDEN)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
    router_logits = torch.randn(num_tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(2))
    topk_weights, topk_ids = select_experts(router_logits, 2, renormalize=True)
    input_scale = None if static_scale is None else torch.tensor(static_scale, device=DEVICE)
    fp8 = [Fp8ExpertWeights(scale.to(DEVICE), block, rows, input_scale)
           for scale, rows in ((scale13, INTERMEDIATE), (scale2, HIDDEN))]
    out = fused_experts(x.to(DEVICE), q13.to(DEVICE), q2.to(DEVICE), topk_weights.to(DEVICE), topk_ids.to(DEVICE),
                        config=sixteen_row_blocks(), w13_fp8=fp8[0], w2_fp8=fp8[1])
    expected = fp8_reference(x, deq13, deq2, topk_weights, topk_ids, block and block[1], static_scale)
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == torch.float32
    # float32 sums under the interpreter; Hopper's FP8 MMA keeps fewer accumulator bits
    tolerance = 2e-4 if DEVICE == "cuda" else 1e-5
    assert ((out.double().cpu() - expected).norm() / expected.norm()).item() < tolerance


def test_block_scaled_experts_refuse_a_tensor_parallel_split_that_cuts_blocks(monkeypatch):
    """A rank's share of the intermediate size must be whole 128 x 128 blocks: Qwen3-30B-A3B-FP8's 768 splits
    so over 2 ranks (384 = 3 blocks), not over 4 (192)."""
    from tokenmill.distributed import parallel_state
    from tokenmill.layers.quantization.fp8 import Fp8Config

    config = Fp8Config.from_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    monkeypatch.setattr(parallel_state, "_TP_SIZE", 2)
    layer = FusedMoE(4, 2, 256, 768, True, "mlp.experts", quant_config=config)
    assert layer.w13_weight.dtype == FP8_DTYPE and layer.w13_weight_scale_inv.shape == (4, 6, 2)
    monkeypatch.setattr(parallel_state, "_TP_SIZE", 4)
    with pytest.raises(ValueError, match=r"mlp.experts: the experts' intermediate size 768 split over "
                                         r"tensor_parallel_size 4 gives 192 rows per rank, not a multiple of the FP8 "
                                         r"weight block \[128, 128\]"):
        FusedMoE(4, 2, 256, 768, True, "mlp.experts", quant_config=config)
