"""Batch-1 matrix-vector products (decode at batch 1 streams every weight once per token): tokenmill's
Triton GEMV against F.linear (cuBLAS) at Llama-3.1-8B and Qwen3-0.6B shapes, bf16.

    python benchmarks/gemv_bench.py           # default tiles vs F.linear, about 20 s on an H100
    python benchmarks/gemv_bench.py --sweep   # also every tile setting (what the defaults came from)

Times are do_bench medians with the L2 flushed between runs (the weights do not stay in L2 across a
decode step either); TB/s counts the weight bytes read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.layers.triton_ops import gemv  # noqa: E402

# name -> (N, K, uses per token)
SHAPES = {
    "llama qkv": (6144, 4096, 32), "llama o": (4096, 4096, 32), "llama gate_up": (28672, 4096, 32),
    "llama down": (4096, 14336, 32), "llama lm_head": (128256, 4096, 1),
    "qwen3 qkv": (4096, 1024, 28), "qwen3 o": (1024, 2048, 28), "qwen3 gate_up": (6144, 1024, 28),
    "qwen3 down": (1024, 3072, 28), "qwen3 lm_head": (151936, 1024, 1),
}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    totals = {"llama": [0.0, 0.0, 0], "qwen3": [0.0, 0.0, 0]}
    print(f"{'matrix':15s} {'N':>7s} {'K':>6s} {'relerr':>8s} {'F.linear us':>11s} {'TB/s':>5s} {'gemv us':>8s} {'TB/s':>5s}"
          + ("  best swept (BLOCK_N, BLOCK_K, warps) TB/s" if args.sweep else ""))
    for name, (n, k, uses) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w.double().T
        out = gemv(x, w)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (name, err)
        t_lin, t_gemv = bench(lambda: F.linear(x, w)), bench(lambda: gemv(x, w))
        nbytes = w.numel() * w.element_size()
        line = (f"{name:15s} {n:7d} {k:6d} {err:8.1e} {t_lin * 1e6:11.1f} {nbytes / t_lin / 1e12:5.2f} "
                f"{t_gemv * 1e6:8.1f} {nbytes / t_gemv / 1e12:5.2f}")
        if args.sweep:
            swept = sorted((bench(lambda: gemv(x, w, block_n=bn, block_k=bk, num_warps=nw)), (bn, bk, nw))
                           for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for nw in (4, 8) if bn * bk <= 16384)
            line += f"  {swept[0][1]} {nbytes / swept[0][0] / 1e12:.2f}"
        print(line)
        total = totals[name.split()[0]]
        total[0] += uses * t_lin
        total[1] += uses * t_gemv
        total[2] += uses * nbytes
        del w
    for model, (t_lin, t_gemv, nbytes) in totals.items():
        print(f"{model} per token (all matrices once): F.linear {t_lin * 1e3:.2f} ms, gemv {t_gemv * 1e3:.2f} ms, "
              f"{nbytes / 1e9:.2f} GB -> {nbytes / t_gemv / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
