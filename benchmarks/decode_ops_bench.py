"""Decode-step pieces as the engine runs them (inside CUDA graphs, weights cold in L2), Llama-3.1-8B, bf16:

  1. the GEMMs of 8 layers (distinct weights, so none stays in L2) for M batch rows: cuBLAS (F.linear)
     against the skinny Triton GEMM of gemm_bench.py with a few tile settings per matrix, per step (x32 layers + LM head);
  2. the sampling kernels at 128,256 vocab (Llama-3.1-8B) and 151,936 (Qwen3) for several split sizes
     (block x split_blocks columns), every row sampled, then every row greedy.

    python benchmarks/decode_ops_bench.py [--m 16 64 128 208 256] [--sampling-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemm_bench import SHAPES as ALL_SHAPES, skinny_mm  # noqa: E402
from tokenmill.layers.cublaslt import graph_time  # noqa: E402
from tokenmill.layers.triton_ops import sample_from_logits  # noqa: E402

SHAPES = {name: ALL_SHAPES[name][:2] for name in ("qkv", "o", "gate_up", "down")}
LAYERS = 8
BANDWIDTH = 3.00e12
# (block_n, block_k, split, warps, stages) candidates per matrix, from gemm_bench.py's sweep
CANDIDATES = {
    "qkv": [(64, 256, 1, 4, 4), (64, 128, 1, 4, 5), (64, 128, 2, 4, 4), (64, 64, 1, 8, 5)],
    "o": [(64, 256, 2, 4, 5), (64, 128, 2, 8, 4), (64, 64, 4, 8, 4), (64, 128, 4, 4, 4)],
    "gate_up": [(128, 128, 1, 8, 4), (64, 128, 1, 4, 3), (128, 64, 1, 8, 3), (128, 64, 1, 8, 4)],
    "down": [(128, 128, 4, 4, 5), (64, 128, 2, 4, 5), (64, 128, 2, 4, 4), (64, 64, 2, 8, 5)],
}


def gemms(ms: list[int]) -> None:
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(LAYERS)]
               for name, (n, k) in SHAPES.items()}
    print(f"GEMMs of {LAYERS} layers in one graph, us per layer (floor at {BANDWIDTH / 1e12:.2f} TB/s)")
    print(f"{'matrix':8s} {'M':>4s} {'floor':>6s} {'cuBLAS':>7s} {'best triton':>11s}  setting")
    for m in ms:
        step_cublas = step_best = 0.0
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            floor = (n * k + m * k + m * n) * 2 / BANDWIDTH
            t_cublas = graph_time(lambda: [F.linear(x, w) for w in weights[name]]) / LAYERS
            results = []
            for setting in CANDIDATES[name]:
                try:
                    skinny_mm(x, weights[name][0], *setting)
                except Exception:  # shapes it does not take, or out of resources
                    continue
                results.append((graph_time(lambda: [skinny_mm(x, w, *setting) for w in weights[name]]) / LAYERS,
                                setting))
            t_best, s_best = min(results)
            step_cublas += t_cublas * 32
            step_best += min(t_best, t_cublas) * 32
            print(f"{name:8s} {m:4d} {floor * 1e6:6.1f} {t_cublas * 1e6:7.1f} {t_best * 1e6:11.1f}  {s_best}")
        print(f"  M={m}: per step (32 layers, no LM head) cuBLAS {step_cublas * 1e3:.2f} ms, "
              f"best of both {step_best * 1e3:.2f} ms")


def sampling() -> None:
    settings = [(512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 4)]
    print("sampling, us per call in a graph; columns (block, split_blocks): " + " ".join(map(str, settings)))
    for vocab in (128256, 151936):
        for rows in (1, 8, 64, 128, 208, 256):
            logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
            for kind, temperature in (("sampled", torch.ones(rows, device="cuda")),
                                      ("greedy", torch.zeros(rows, device="cuda"))):
                row = []
                for block, split_blocks in settings:
                    drawn = sample_from_logits(logits, temperature, 7, block=block, split_blocks=split_blocks)
                    if kind == "greedy":
                        assert torch.equal(drawn, logits.float().argmax(dim=-1))
                    row.append(graph_time(lambda: sample_from_logits(logits, temperature, 7, block=block,
                                                                     split_blocks=split_blocks)))
                print(f"vocab {vocab} {rows:4d} rows {kind:8s}" + " ".join(f"{t * 1e6:8.1f}" for t in row))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[16, 64, 128, 208, 256])
    parser.add_argument("--sampling-only", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    sampling()
    if not args.sampling_only:
        gemms(args.m)


if __name__ == "__main__":
    main()
