"""Decode-sized GEMMs: a skinny Triton GEMM (swapped operands, optional split-K; a candidate kept here,
not used by the engine) against F.linear (cuBLAS) at Llama-3.1-8B's shapes for M = batch rows, bf16,
with every tile setting swept.

    python benchmarks/gemm_bench.py [--m 16 64 128 256] [--shapes qkv o gate_up down lm_head]

Compiles every setting first in parallel processes (Triton's on-disk cache), then times each with
triton.testing.do_bench (L2 flushed between runs: a decode step's weights do not stay in L2 either).
The floor per matrix is max(bytes moved / 3.00 TB/s, FLOPs / 798 TFLOP/s), both measured on the H100.
Prints per (matrix, M): cuBLAS, the best setting, and the per-step total (x layers).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _skinny_mm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, x_stride, w_stride, out_stride, k_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    # Swapped operands: the weight tile [BLOCK_N, BLOCK_K] is the MMA's long side and the few rows of x
    # its short one, so one tile of BLOCK_M >= M rows reads each weight element exactly once.
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = pid_s * k_per_split + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * w_stride + rk[None, :]
    x_ptrs = x_ptr + rm[None, :] * x_stride + rk[:, None]
    m_mask = rm[None, :] < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        acc = tl.dot(tl.load(w_ptrs), tl.load(x_ptrs, mask=m_mask, other=0.0), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if SPLIT == 1:
        tl.store(out_ptr + rm[None, :] * out_stride + rn[:, None], acc.to(out_ptr.dtype.element_ty), mask=m_mask)
    else:  # float32 partial sums [SPLIT, M, N], added up by _split_sum_kernel
        tl.store(out_ptr + (pid_s * M + rm[None, :]).to(tl.int64) * N + rn[:, None], acc, mask=m_mask)


@triton.jit
def _split_sum_kernel(partial_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(partial_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def skinny_mm(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, split: int, num_warps: int,
              num_stages: int) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T -> [M, N] for M <= 256 (decode batches), accumulated in float32; K is cut
    into `split` ranges whose partial sums a second kernel adds. Needs N % block_n == 0 and
    K % (split * block_k) == 0."""
    m, k = x.shape
    n = weight.shape[0]
    if m > 256 or n % block_n or k % (split * block_k) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"skinny_mm: unsupported shapes x {tuple(x.shape)}, weight {tuple(weight.shape)} for "
                         f"block_n={block_n}, block_k={block_k}, split={split}")
    block_m = max(16, triton.next_power_of_2(m))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    _skinny_mm_kernel[(n // block_n, split)](x, weight, target, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                                             k // split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                             SPLIT=split, num_warps=num_warps, num_stages=num_stages)
    if split > 1:
        _split_sum_kernel[(triton.cdiv(m * n, 1024),)](target, out, m * n, SPLIT=split, BLOCK=1024, num_warps=4)
    return out


# name -> (N, K, uses per step)
SHAPES = {"qkv": (6144, 4096, 32), "o": (4096, 4096, 32), "gate_up": (28672, 4096, 32), "down": (4096, 14336, 32),
          "lm_head": (128256, 4096, 1)}
BANDWIDTH, PEAK = 3.00e12, 798e12
SMS = 132


def settings(m: int, n: int, k: int) -> list[tuple[int, int, int, int, int]]:
    """(block_n, block_k, split, warps, stages) that fit shared memory and give a sensible grid."""
    block_m = max(16, triton.next_power_of_2(m))
    out = []
    for bn, bk, split, warps, stages in itertools.product((64, 128), (64, 128, 256), (1, 2, 4, 8), (4, 8), (3, 4, 5)):
        if n % bn or k % (split * bk) or stages * (bn + block_m) * bk * 2 > 220 * 1024:
            continue
        programs = n // bn * split
        if not SMS // 2 <= programs <= 12 * SMS and not (split == 1 and programs > 12 * SMS):
            continue
        out.append((bn, bk, split, warps, stages))
    return out


def _compile(job: tuple[int, tuple[int, int, int, int, int]]) -> str | None:
    m, (bn, bk, split, warps, stages) = job
    x = torch.zeros(m, split * bk, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(2 * bn, split * bk, device="cuda", dtype=torch.bfloat16)
    try:
        skinny_mm(x, w, bn, bk, split, warps, stages)
        torch.cuda.synchronize()
    except Exception as e:  # out of resources: skipped when timing too
        return f"{job}: {type(e).__name__}"
    return None


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=15, return_mode="median") * 1e-3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--procs", type=int, default=14)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    jobs = sorted({(m if m % 16 else max(16, triton.next_power_of_2(m)), s) for m in args.m for name in args.shapes
                   for s in settings(m, *SHAPES[name][:2])})
    with mp.get_context("spawn").Pool(args.procs) as pool:
        failed = [r for r in pool.map(_compile, jobs, chunksize=1) if r]
    print(f"compiled {len(jobs)} kernels, {len(failed)} failed", flush=True)
    totals: dict[int, list[float]] = {m: [0.0, 0.0, 0.0] for m in args.m}
    print(f"{'matrix':8s} {'M':>4s} {'floor us':>8s} {'cuBLAS us':>9s} {'%floor':>6s} {'triton us':>9s} {'%floor':>6s} "
          f"{'speedup':>7s}  best (block_n, block_k, split, warps, stages)")
    for name in args.shapes:
        n, k, uses = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ w.double().T
            floor = max((n * k + m * k + m * n) * 2 / BANDWIDTH, 2 * m * n * k / PEAK)
            t_cublas = bench(lambda: F.linear(x, w))
            best = (float("inf"), None)
            for s in settings(m, n, k):
                try:
                    out = skinny_mm(x, w, *s)
                except Exception:
                    continue
                err = ((out.double() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (name, m, s, err)
                best = min(best, (bench(lambda: skinny_mm(x, w, *s)), s))
            t_best, s_best = best
            totals[m][0] += floor * uses
            totals[m][1] += t_cublas * uses
            totals[m][2] += min(t_best, t_cublas) * uses
            print(f"{name:8s} {m:4d} {floor * 1e6:8.1f} {t_cublas * 1e6:9.1f} {100 * floor / t_cublas:5.1f}% "
                  f"{t_best * 1e6:9.1f} {100 * floor / t_best:5.1f}% {t_cublas / t_best:7.2f}x  {s_best}", flush=True)
    print(f"per decode step ({', '.join(args.shapes)}; x uses): M, floor ms, cuBLAS ms, best of both ms")
    for m, (fl, cb, bb) in totals.items():
        print(f"  M={m:4d}  floor {fl * 1e3:6.2f}  cuBLAS {cb * 1e3:6.2f} ({100 * fl / cb:.0f}%)  "
              f"best {bb * 1e3:6.2f} ({100 * fl / bb:.0f}%)")


if __name__ == "__main__":
    main()
