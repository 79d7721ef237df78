"""Decode-sized GEMMs: every algorithm cuBLASLt's heuristic offers against the one F.linear runs, at
Llama-3.1-8B's shapes for M batch rows, bf16, inside CUDA graphs of 8 layers with distinct weights (as
the engine replays a decode step; the weights do not stay in L2).

    python benchmarks/cublaslt_bench.py [--m 16 64 128 208 256] [--shapes qkv o gate_up down lm_head]

Prints, per (matrix, M): the weight-read floor at 3.00 TB/s, F.linear, the heuristic's first choice,
the fastest algorithm (its index in the heuristic's list, tile id, split-K) and the per-step totals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_ops_bench import LAYERS  # noqa: E402
from gemm_bench import SHAPES as ALL_SHAPES  # noqa: E402
from tokenmill.layers.cublaslt import LtMatmul, algo_config, candidate_pool, graph_time  # noqa: E402

BANDWIDTH = 3.00e12
OTHER_M = [8, 16, 32, 48, 64, 96, 128, 160, 192, 208, 224, 256, 384, 512, 1024]
OTHER_M_LARGE = [2048, 4096, 8192, 16384, 32768]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[16, 64, 128, 208, 256])
    parser.add_argument("--shapes", nargs="+", default=["qkv", "o", "gate_up", "down"])
    args = parser.parse_args()
    shapes = {name: ALL_SHAPES[name][:2] for name in args.shapes}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}")
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(LAYERS)]
               for name, (n, k) in shapes.items()}
    print(f"us per layer; {LAYERS} layers per graph")
    print(f"{'matrix':8s} {'M':>4s} {'floor':>6s} {'linear':>7s} {'lin-lt':>7s} {'lt[0]':>7s} {'lt best':>7s} {'#ok':>4s}  "
          "best (index, tile, split-K, stages)")
    for m in args.m:
        step = {"linear": 0.0, "first": 0.0, "best": 0.0}
        reps = 20 if m <= 1024 else 4
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
            ref = F.linear(x, weights[name][0]).float()
            floor = (n * k + m * k + m * n) * 2 / BANDWIDTH
            t_linear = graph_time(lambda: [F.linear(x, w) for w in weights[name]], reps) / LAYERS
            torch.backends.cuda.preferred_blas_library("cublaslt")
            t_linear_lt = graph_time(lambda: [F.linear(x, w) for w in weights[name]], reps) / LAYERS
            torch.backends.cuda.preferred_blas_library("cublas")
            lt = LtMatmul(m, n, k, torch.bfloat16)
            others = [o for o in (OTHER_M if m <= 1024 else OTHER_M_LARGE) if o != m]  # their picks widen the search
            candidates = [a for a in candidate_pool(n, k, torch.bfloat16, [m] + others) if lt.supports(a)]
            timed = []
            for index, algo in enumerate(candidates):
                lt.run(x, weights[name][0], outs[0], algo)
                err = ((outs[0].float() - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-2:
                    print(f"  {name} M={m} algo {index}: relative error {err:.2e}, skipped")
                    continue
                t = graph_time(lambda: [lt.run(x, w, o, algo) for w, o in zip(weights[name], outs)], reps) / LAYERS
                timed.append((t, index, algo))
            t_first = timed[0][0] if timed and timed[0][1] == 0 else float("nan")
            t_best, i_best, a_best = min(timed, key=lambda r: r[0])
            cfg = algo_config(a_best)
            step["linear"] += t_linear * 32
            step["first"] += t_first * 32
            step["best"] += min(t_best, t_linear) * 32
            print(f"{name:8s} {m:4d} {floor * 1e6:6.1f} {t_linear * 1e6:7.1f} {t_linear_lt * 1e6:7.1f} {t_first * 1e6:7.1f} "
                  f"{t_best * 1e6:7.1f} {len(timed):4d}  ({i_best}, {cfg['tile']}, {cfg['split_k']}, {cfg['stages']})")
        print(f"  M={m}: per step (32 layers of {'/'.join(shapes)}) F.linear {step['linear'] * 1e3:.2f} ms, "
              f"heuristic's first {step['first'] * 1e3:.2f} ms, best {step['best'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
