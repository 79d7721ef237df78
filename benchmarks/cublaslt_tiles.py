"""Beyond cuBLASLt's heuristic: does another tile (or stages setting) of the algorithms it offers run a
decode-sized GEMM faster? For each Llama-3.1-8B weight shape and batch size M, the heuristic pool that
`cublaslt.tune` screens is timed, then every algorithm of it re-configured with each tile id and stages id
its capabilities list (one setting changed at a time; cublasLtMatmulAlgoCapGetAttribute), weights cold
in L2 as in a decode step.

Usage (device machine, repo root): python3 benchmarks/cublaslt_tiles.py [--m 208 256] [--shapes gate_up down]
"""

from __future__ import annotations

import argparse
import ctypes

import torch
import torch.nn.functional as F

from tokenmill.layers import cublaslt
from tokenmill.layers.cublaslt import LtMatmul, _library, algo_config, candidate_pool, graph_time

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
_CAP_TILE_IDS, _CAP_STAGES_IDS = 6, 13


def cap_list(algo, attr: int) -> list[int]:
    lib = _library()
    needed = ctypes.c_size_t()
    if lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, 0, ctypes.byref(needed)) != 0:
        return []
    values = (ctypes.c_uint32 * max(1, needed.value // 4))()
    written = ctypes.c_size_t()
    if lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, values, ctypes.sizeof(values),
                                             ctypes.byref(written)) != 0:
        return []
    return list(values)[:written.value // 4]


def with_config(algo, attr: int, value: int):
    copy = cublaslt._Algo.from_buffer_copy(algo)
    v = ctypes.c_uint32(value)
    status = _library().cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(copy), attr, ctypes.byref(v), 4)
    return copy if status == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[208, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "cuBLASLt", _library().cublasLtGetVersion())
    dtype = torch.bfloat16
    for name in args.shapes:
        n, k = SHAPES[name]
        per_weight = n * k * 2
        count = max(2, -(-cublaslt.ROTATION_BYTES // per_weight))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(count)]
        pool = candidate_pool(n, k, dtype)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            out = torch.empty(m, n, device="cuda", dtype=dtype)
            lt = LtMatmul(m, n, k, dtype)
            reps = len(weights)

            def timed(algo) -> float:
                return graph_time(lambda: [lt.run(x, w, out, algo) for w in weights], 5) / reps * 1e6

            floor = (per_weight + 2 * m * (n + k)) / 3.0e12 * 1e6
            linear = graph_time(lambda: [F.linear(x, w) for w in weights], 5) / reps * 1e6
            base = sorted((timed(a), i) for i, a in enumerate(pool) if lt.supports(a))
            best_pool, best_i = base[0]
            variants, seen = [], {bytes(a) for a in pool}
            for i, algo in enumerate(pool):
                for attr, cap in ((1, _CAP_TILE_IDS), (6, _CAP_STAGES_IDS)):
                    for value in cap_list(algo, cap):
                        v = with_config(algo, attr, value)
                        if v is not None and bytes(v) not in seen and lt.supports(v):
                            seen.add(bytes(v))
                            variants.append(v)
            timed_variants = sorted((timed(v), j) for j, v in enumerate(variants))
            top = timed_variants[:3]
            print(f"{name:8s} M={m:3d} floor {floor:6.1f} us  F.linear {linear:6.1f}  pool best {best_pool:6.1f} "
                  f"({len(base)} ok, {algo_config(pool[best_i])})  variants: {len(variants)} ok, best "
                  + ", ".join(f"{t:6.1f} {algo_config(variants[j])}" for t, j in top), flush=True)


if __name__ == "__main__":
    main()
