"""Triton paged-attention kernels at Llama-3.1-8B shapes: correctness vs float64, then time vs roofline.

    python benchmarks/kernel_bench.py            # check + time, about half a minute on an H100 or H200
    python benchmarks/kernel_bench.py --tune     # also sweep tile settings (slower)
    python benchmarks/kernel_bench.py --fp8      # an e4m3 KV cache, then the FP8 GEMMs of Llama-3.1-8B
    python benchmarks/kernel_bench.py --moe      # only the fused MoE experts at three models' shapes
    python benchmarks/kernel_bench.py --moe --tune  # and their tile settings swept
    python benchmarks/kernel_bench.py --moe --tune --moe-shapes qwen3-30b-a3b  # one model (~40 compiles a row)

Shapes: 32 query heads, 8 KV heads, head_dim 128, bf16, block_size 16; block ids shuffled across a
cache with twice the blocks needed. Decode rows are timed eagerly with triton.testing.do_bench (median,
L2 flushed between runs, so launch overhead hides behind the flush) and as a CUDA-graph replay (what
the engine runs). The floor is the larger of bytes / bandwidth and FLOPs / tensor-core rate, the bandwidth
being a device-to-device copy's measured at the start; bytes count the KV cache read once plus q and out.
The peer is torch's scaled_dot_product_attention over the same keys stored contiguously (no paging), which
is the bar a paged kernel should come close to.

With --fp8 the cache holds e4m3 with per-tensor k and v scales (the reference and the peer use the dequantized
keys, so the peer reads twice the bytes), and a second table times the FP8 linear layers at Llama-3.1-8B's
shapes (per-channel weights, as `--quantization fp8` makes them) against bf16 cuBLAS: batch 1 through the FP8
GEMV, 2-64 rows through fp8_small_m (floor: weight bytes / bandwidth), larger batches through torch._scaled_mm
with per-token activation quantization included (floor: FLOPs / twice the bf16 rate).

With --moe, the experts of one MoE layer (fused_moe_triton.fused_experts: routing sort, two grouped GEMMs, the
activation, the sum over slots) of Qwen3-30B-A3B, GPT-OSS-20B and DeepSeek-V2-Lite, bf16, random routing, at
1 to 4,096 tokens in a CUDA graph, against a float64 per-expert loop; the floor is the larger of the bytes of the
experts the tokens touch (read once) / bandwidth and the FLOPs / the bf16 rate. The routing sort alone is
timed beside it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.attention import triton_paged  # noqa: E402
from tokenmill.attention.triton_paged import paged_attention  # noqa: E402
from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX  # noqa: E402
from tokenmill.layers.fp8_ops import SMALL_M_16BIT_ROWS, quant_fp8  # noqa: E402
from tokenmill.layers.quantization.fp8 import fp8_linear, quantize_per_channel  # noqa: E402

PEAK_FLOPS = 7.9e14  # dense bf16 tensor cores, as a large GEMM measures it on an H100 or H200
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


class Case:
    """One attention step: requests with (context, new tokens), laid out in a shuffled paged cache."""

    def __init__(self, name: str, seq_lens: list[int], q_lens: list[int], extra_table_columns: int = 0,
                 fp8: bool = False):
        self.name, self.seq_lens_list, self.q_lens_list = name, seq_lens, q_lens
        gen = torch.Generator(device="cuda").manual_seed(0)
        blocks_needed = [-(-s // BLOCK_SIZE) for s in seq_lens]
        num_blocks = 2 * sum(blocks_needed) + 1
        order = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
        width = max(blocks_needed) + extra_table_columns
        self.block_table = torch.zeros((len(seq_lens), width), dtype=torch.int32, device="cuda")
        starts = [0] + torch.tensor(blocks_needed).cumsum(0).tolist()
        for i, n in enumerate(blocks_needed):
            self.block_table[i, :n] = order[starts[i] : starts[i] + n]
        self.kv_cache = torch.randn(
            (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), device="cuda", dtype=DTYPE, generator=gen
        )
        self.k_scale = self.v_scale = 1.0
        if fp8:  # e4m3 over its whole range; contiguous_kv dequantizes for the reference and the peer
            self.k_scale, self.v_scale = (self.kv_cache[i].abs().max().item() / FP8_MAX for i in (0, 1))
            scaled = [self.kv_cache[0] / self.k_scale, self.kv_cache[1] / self.v_scale]
            self.kv_cache = torch.stack(scaled).to(FP8_DTYPE)
        # as the engine passes them: device tensors (none is made while a CUDA graph captures)
        self.scale_tensors = [torch.tensor(s, device="cuda") for s in (self.k_scale, self.v_scale)]
        self.query = torch.randn((sum(q_lens), NUM_HEADS, HEAD_DIM), device="cuda", dtype=DTYPE, generator=gen)
        self.query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                                            device="cuda")  # fmt: skip
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        self.scale = HEAD_DIM**-0.5
        self.out = torch.empty_like(self.query)

    def run(self) -> torch.Tensor:
        return paged_attention(self.query, self.kv_cache, self.query_start_loc, self.seq_lens, self.block_table,
                               self.scale, max(self.q_lens_list), out=self.out, k_scale=self.scale_tensors[0],
                               v_scale=self.scale_tensors[1])  # fmt: skip

    def kv_bytes(self) -> int:
        kv = sum(self.seq_lens_list) * NUM_KV_HEADS * HEAD_DIM * 2 * self.kv_cache.element_size()
        return kv + 2 * self.query.numel() * self.query.element_size()

    def flops(self) -> int:
        pairs = sum(sum(s - q + j + 1 for j in range(q)) for s, q in zip(self.seq_lens_list, self.q_lens_list))
        return 4 * NUM_HEADS * HEAD_DIM * pairs

    def contiguous_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request i's keys and values gathered out of the cache: [num_kv_heads, seq_len, head_dim]."""
        pos = torch.arange(self.seq_lens_list[i], device="cuda")
        blocks = self.block_table[i, pos // BLOCK_SIZE].long()
        k = self.kv_cache[0, blocks, pos % BLOCK_SIZE].transpose(0, 1)
        v = self.kv_cache[1, blocks, pos % BLOCK_SIZE].transpose(0, 1)
        if self.kv_cache.dtype == FP8_DTYPE:
            return (k.to(DTYPE) * self.k_scale).to(DTYPE), (v.to(DTYPE) * self.v_scale).to(DTYPE)
        return k, v

    def max_rel_err(self, out: torch.Tensor, request_ids: list[int]) -> float:
        """‖out − ref‖/‖ref‖ against float64, over the given requests (all of them would not fit)."""
        errs = []
        starts = self.query_start_loc.tolist()
        group = NUM_HEADS // NUM_KV_HEADS
        for i in request_ids:
            s, q_len = self.seq_lens_list[i], self.q_lens_list[i]
            k, v = self.contiguous_kv(i)
            q = self.query[starts[i] : starts[i] + q_len].transpose(0, 1).double()  # [heads, q, d]
            ref = torch.empty_like(q)
            query_pos = s - q_len + torch.arange(q_len, device="cuda")
            causal = torch.arange(s, device="cuda")[None, :] > query_pos[:, None]
            for h in range(NUM_HEADS):  # one head at a time keeps the float64 scores small
                scores = (q[h] @ k[h // group].double().T) * self.scale
                ref[h] = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v[h // group].double()
            got = out[starts[i] : starts[i] + q_len].transpose(0, 1).double()
            errs.append(((got - ref).norm() / ref.norm()).item())
        return max(errs)

    def peer(self):
        """torch SDPA over contiguous copies of the same keys (made once, outside the timing)."""
        F = torch.nn.functional
        if len(set(self.seq_lens_list)) == 1 and len(set(self.q_lens_list)) == 1:
            kvs = [self.contiguous_kv(i) for i in range(len(self.seq_lens_list))]
            k = torch.stack([kv[0] for kv in kvs])
            v = torch.stack([kv[1] for kv in kvs])
            q = self.query.view(len(kvs), self.q_lens_list[0], NUM_HEADS, HEAD_DIM).transpose(1, 2)
            causal = self.q_lens_list[0] > 1
            if causal:
                assert self.q_lens_list[0] == self.seq_lens_list[0], "peer handles whole prompts only"
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale, enable_gqa=True)
        return None


GRAPH_REPEATS = 10


def bench_graph(fn) -> float:
    """fn's time inside a CUDA graph of GRAPH_REPEATS calls, per call: as in the engine's graphs, where kernels
    follow one another, without the graph launch itself (some 10 us, more than a small kernel takes)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPEATS):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") / GRAPH_REPEATS


def measure_copy_bandwidth() -> float:
    buffers = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(2)]
    ms = triton.testing.do_bench(lambda: buffers[1].copy_(buffers[0]), warmup=25, rep=100, return_mode="median")
    buffers.clear()
    return 2 * (1 << 30) / (ms * 1e-3)


def decode_cases(fp8: bool) -> list[Case]:
    cases = []
    for batch in (1, 32, 256):
        for ctx in (1024, 4096):
            # 256 blocks of slack in the table: the split count comes from its width, not from seq_lens.
            cases.append(Case(f"decode b={batch} ctx={ctx}", [ctx] * batch, [1] * batch, extra_table_columns=256,
                              fp8=fp8))
    return cases


LLAMA_8B_LINEARS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def fp8_gemm_rows(copy_bw: float) -> None:
    """FP8 linear layers (per-channel weights, per-token activations) at Llama-3.1-8B's shapes against bf16."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"\n{'linear':10s} {'M':>5s} {'relerr':>8s} {'fp8 ms':>8s} {'bf16 ms':>8s} {'GB/s':>7s} {'TFLOP/s':>8s} "
          f"{'floor ms':>9s} {'x floor':>8s}")  # fmt: skip
    for name, n, k in LLAMA_8B_LINEARS:
        w16 = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(DTYPE)
        weight, scale = quantize_per_channel(w16)
        for m in (1, 8, 16, 32, 64, 128, 512, 4096):
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=DTYPE)
            got = fp8_linear(x, weight, scale, None, None)
            if m <= SMALL_M_16BIT_ROWS:  # the GEMV and fp8_small_m read 16-bit activations (as fp16)
                x_ref = x.half().double()
            else:
                q, x_scale = quant_fp8(x)
                x_ref = q.double() * x_scale.double()
            ref = x_ref @ (weight.double() * scale.double()[:, None]).T
            err = ((got.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"fp8 {name} M={m}: rel err {err:.2e}"
            ms = bench_graph(functools.partial(fp8_linear, x, weight, scale, None, None))
            bf16_ms = bench_graph(functools.partial(torch.matmul, x, w16.T))
            nbytes, flops = n * k + 2 * m * (n + k), 2 * m * n * k
            floor_ms = max(nbytes / copy_bw, flops / (2 * PEAK_FLOPS)) * 1e3
            print(f"{name:10s} {m:5d} {err:8.1e} {ms:8.4f} {bf16_ms:8.4f} {nbytes / ms / 1e6:7.0f} "
                  f"{flops / ms / 1e9:8.1f} {floor_ms:9.4f} {ms / floor_ms:8.2f}")  # fmt: skip


MOE_SHAPES = [("qwen3-30b-a3b", 128, 8, 2048, 768), ("gpt-oss-20b", 32, 4, 2880, 2880),
              ("gpt-oss-20b mxfp4", 32, 4, 2880, 2880),
              ("deepseek-v2-lite", 64, 6, 2048, 1408)]  # name, experts, top-k, hidden, expert intermediate


def moe_configs(tokens: int, num_experts: int) -> list:
    """The grouped GEMM tiles --moe --tune sweeps at a step of `tokens`."""
    from tokenmill.layers.fused_moe_triton import GemmConfig

    rows = (16,) if tokens <= num_experts else (64, 128)
    return [GemmConfig(m, n, k, w, st) for m in rows for n in (32, 64, 128) for k in (64, 128) for w in (4, 8)
            for st in (3, 4) if not (m == 128 and n == 128 and st == 4)]


def moe_rows(copy_bw: float, tune: bool, names: list[str]) -> None:
    """One MoE layer's experts (bf16) at the shapes of the models `names` (all when empty) and 1..4,096 tokens,
    against its floor; with `tune`, each tile setting of moe_configs, the best printed beside the default."""
    from tokenmill.layers.fused_moe import experts_loop
    from tokenmill.layers.fused_moe_triton import fused_experts, gemm_config, moe_align_block_size
    from tokenmill.layers.quantization.mxfp4 import dequantize_mxfp4

    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"\n{'experts':18s} {'T':>5s} {'relerr':>8s} {'ms':>8s} {'align ms':>9s} {'GB/s':>7s} {'TFLOP/s':>8s} "
          f"{'floor ms':>9s} {'x floor':>8s}")  # fmt: skip
    for name, num_experts, top_k, hidden, inter in MOE_SHAPES:
        if names and name not in names:
            continue
        mx = {}
        if name.endswith("mxfp4"):  # codes and exponents as FusedMoE keeps them; w13 / w2 their values
            for proj, rows, cols in (("w13", 2 * inter, hidden), ("w2", hidden, inter)):
                codes = torch.randint(0, 256, (num_experts, rows, cols // 2), dtype=torch.uint8, device="cuda",
                                      generator=gen)
                exponents = torch.randint(118, 122, (num_experts, rows, cols // 32), dtype=torch.uint8,
                                          device="cuda", generator=gen)
                mx[proj] = (codes, exponents)
            w13, w2 = (dequantize_mxfp4(c.unflatten(-1, (-1, 16)), e, DTYPE) for c, e in mx.values())
        else:
            w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * 0.03).to(DTYPE)
            w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * 0.03).to(DTYPE)
        weights = (mx["w13"][0], mx["w2"][0]) if mx else (w13, w2)
        kwargs = dict(w13_mxfp4_scales=mx["w13"][1], w2_mxfp4_scales=mx["w2"][1]) if mx else {}
        for tokens in (1, 8, 32, 256, 4096):
            x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(DTYPE)
            logits = torch.randn(tokens, num_experts, device="cuda", generator=gen)
            topk_weights, topk_ids = logits.softmax(-1).topk(top_k, dim=-1)
            got = fused_experts(x, *weights, topk_weights, topk_ids, **kwargs)
            if tokens <= 32:
                used, local_ids = topk_ids.unique(return_inverse=True)  # only the touched experts to the host
                ref = experts_loop(x.double().cpu(), w13[used].double().cpu(), w2[used].double().cpu(),
                                   topk_weights.double().cpu(), local_ids.cpu())
                err = ((got.double().cpu() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, f"moe {name} T={tokens}: rel err {err:.2e}"
            else:
                err = float("nan")
            ms = bench_graph(functools.partial(fused_experts, x, *weights, topk_weights, topk_ids, **kwargs))
            block_m = gemm_config(tokens, num_experts, top_k).block_m
            align_ms = bench_graph(functools.partial(moe_align_block_size, topk_ids, block_m, num_experts))
            touched = int(topk_ids.unique().numel())
            nbytes = int(touched * 3 * inter * hidden * (0.5 + 1 / 32 if mx else 2)) + tokens * hidden * 2 * 2
            flops = 2 * tokens * top_k * 3 * inter * hidden
            floor_ms = max(nbytes / copy_bw, flops / PEAK_FLOPS) * 1e3
            print(f"{name:18s} {tokens:5d} {err:8.1e} {ms:8.4f} {align_ms:9.4f} {nbytes / ms / 1e6:7.0f} "
                  f"{flops / ms / 1e9:8.1f} {floor_ms:9.4f} {ms / floor_ms:8.2f}")  # fmt: skip
            if tune:
                timed = [(bench_graph(functools.partial(fused_experts, x, *weights, topk_weights, topk_ids, config,
                                                        **kwargs)), config)
                         for config in moe_configs(tokens, num_experts)]
                timed.sort(key=lambda timed_config: timed_config[0])
                print(f"    default {gemm_config(tokens, num_experts, top_k)}: {ms:.4f} ms; best: "
                      + "; ".join(f"{c} {t:.4f} ms" for t, c in timed[:3]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true", help="sweep decode/prefill tile settings")
    parser.add_argument("--fp8", action="store_true", help="an e4m3 KV cache, then the FP8 GEMMs")
    parser.add_argument("--moe", action="store_true", help="only the fused MoE experts")
    parser.add_argument("--moe-shapes", default="", help="comma-separated MOE_SHAPES names (default: all)")
    args = parser.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    copy_bw = measure_copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write); roofline uses it and "
          f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s")  # fmt: skip
    if args.moe:
        moe_rows(copy_bw, args.tune, [n for n in args.moe_shapes.split(",") if n])
        print(f"\n(total {time.time() - t0:.0f} s)")
        return

    cases = decode_cases(args.fp8) + [
        Case("prefill 4096", [4096], [4096], fp8=args.fp8),
        Case("mixed 512-chunk + 255 decodes", [2048] + [1024] * 255, [512] + [1] * 255, fp8=args.fp8),
    ]
    rows = []
    for case in cases:
        is_decode = max(case.q_lens_list) == 1
        out = case.run().clone()
        n = len(case.seq_lens_list)
        err = case.max_rel_err(out, sorted({0, n // 2, n - 1}))
        assert err < 1e-2, f"{case.name}: rel err {err:.2e}"
        ms = triton.testing.do_bench(case.run, warmup=25, rep=100, return_mode="median")
        graph_ms = bench_graph(case.run) if is_decode else float("nan")
        peer = case.peer()
        peer_ms = triton.testing.do_bench(peer, warmup=25, rep=100, return_mode="median") if peer else float("nan")
        floor_ms = max(case.kv_bytes() / copy_bw, case.flops() / PEAK_FLOPS) * 1e3
        best = min(ms, graph_ms) if is_decode else ms
        rows.append((case.name, err, ms, graph_ms, peer_ms, case.kv_bytes() / (best * 1e-3) / 1e9,
                     case.flops() / (best * 1e-3) / 1e12, floor_ms, best / floor_ms))  # fmt: skip

    if args.tune:
        tune(cases)

    print(f"\n{'case':32s} {'relerr':>8s} {'ms':>8s} {'graph ms':>9s} {'sdpa ms':>8s} {'GB/s':>7s} {'TFLOP/s':>8s} "
          f"{'floor ms':>9s} {'x floor':>8s}")  # fmt: skip
    for name, err, ms, graph_ms, peer_ms, gbs, tflops, floor_ms, ratio in rows:
        print(f"{name:32s} {err:8.1e} {ms:8.4f} {graph_ms:9.4f} {peer_ms:8.4f} {gbs:7.0f} {tflops:8.1f} "
              f"{floor_ms:9.4f} {ratio:8.2f}")  # fmt: skip
    if args.fp8:
        fp8_gemm_rows(copy_bw)
    print(f"\n(total {time.time() - t0:.0f} s)")


BASE_CONFIG = triton_paged._launch_config


def decode_config(block_n: int, warps: int, stages: int):
    """A stand-in for triton_paged._launch_config: these decode settings, the engine's for prefill."""
    def cfg(dtype, head_dim_pad, group_pad, max_query_len, *rest):
        c = BASE_CONFIG(dtype, head_dim_pad, group_pad, max_query_len, *rest)
        return dict(c, BLOCK_N=block_n, num_warps=warps, num_stages=stages) if max_query_len == 1 else c
    return cfg


def prefill_config(rows: int, block_n: int, warps: int, stages: int):
    """A stand-in for triton_paged._launch_config: query tiles of up to `rows` rows and these prefill
    settings, the engine's for decode."""
    def cfg(dtype, head_dim_pad, group_pad, max_query_len, *rest):
        c = BASE_CONFIG(dtype, head_dim_pad, group_pad, max_query_len, *rest)
        if max_query_len == 1:
            return c
        m = max(16, group_pad, min(rows, triton.next_power_of_2(max_query_len) * group_pad))
        return dict(c, BLOCK_M=m, BLOCK_Q=m // group_pad, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return cfg


def tune(cases: list[Case]) -> None:
    """Sweep launch settings by overriding the config and split policy; prints ms per setting
    (decode: CUDA-graph replays; prefill: eager)."""
    base_programs = triton_paged.PROGRAMS_PER_SM
    decode = [c for c in cases if max(c.q_lens_list) == 1]
    prefill = [c for c in cases if max(c.q_lens_list) > 1]
    print("\ndecode sweep (ms, graph replay):", ", ".join(c.name for c in decode))
    for block_n, warps, stages, per_sm in [(64, 4, 3, 4), (64, 4, 2, 4), (128, 4, 2, 4), (128, 4, 3, 4),
                                           (64, 4, 3, 8), (128, 4, 2, 8), (32, 4, 3, 8), (64, 2, 3, 4),
                                           (64, 8, 3, 4), (128, 8, 2, 4), (64, 4, 3, 16)]:  # fmt: skip
        triton_paged._launch_config = decode_config(block_n, warps, stages)
        triton_paged.PROGRAMS_PER_SM = per_sm
        triton_paged._decode_num_splits.cache_clear()
        print(f"  BLOCK_N={block_n:3d} warps={warps} stages={stages} per_sm={per_sm:2d}: " + _time_all(decode, True))
    triton_paged._launch_config, triton_paged.PROGRAMS_PER_SM = BASE_CONFIG, base_programs
    triton_paged._decode_num_splits.cache_clear()
    print("prefill sweep (ms):", ", ".join(c.name for c in prefill))
    for block_m, block_n, warps, stages in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3),
                                            (128, 128, 8, 2), (128, 128, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3),
                                            (64, 64, 4, 4), (64, 32, 4, 3), (32, 64, 4, 3)]:  # fmt: skip
        triton_paged._launch_config = prefill_config(block_m, block_n, warps, stages)
        print(f"  BLOCK_M={block_m:3d} BLOCK_N={block_n:3d} warps={warps} stages={stages}: " + _time_all(prefill))
    triton_paged._launch_config = BASE_CONFIG


def _time_all(cases: list[Case], graph: bool = False) -> str:
    try:
        if graph:
            return " ".join(f"{bench_graph(c.run):.4f}" for c in cases)
        return " ".join(f"{triton.testing.do_bench(c.run, warmup=10, rep=40, return_mode='median'):.4f}" for c in cases)
    except Exception as e:  # a setting that does not fit (shared memory, registers) is just reported
        return f"failed: {type(e).__name__}: {str(e)[:80]}"


if __name__ == "__main__":
    main()
