"""Decode attention with nano-like context lengths (uneven, uniform in [200, 2048]): does the order of the
requests matter, and does mapping tiles to requests through a sorted `order` (longest started first, no
search for the owning request) help? --sweep also times tile settings; --small times tile settings and
split counts at the batch sizes of the run's tail (8-96 requests of 600-2,048 tokens).

    python benchmarks/decode_balance_bench.py [--sweep] [--small]

Also prints the read bandwidth of a plain reduction over 4 GiB, the practical ceiling for decode.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_bench import BASE_CONFIG, Case, bench_graph, decode_config  # noqa: E402
from tokenmill.attention import triton_paged  # noqa: E402
from tokenmill.attention.triton_paged import paged_attention  # noqa: E402


def read_bandwidth() -> float:
    x = torch.empty(2 << 30, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: x.sum(dtype=torch.float32), warmup=10, rep=50, return_mode="median")
    return x.numel() * 2 / (ms * 1e-3)


def main() -> None:
    print(torch.cuda.get_device_name())
    print(f"read bandwidth (bf16 sum over 4 GiB): {read_bandwidth() / 1e12:.2f} TB/s")
    rng = random.Random(0)
    for batch in (64, 128, 208, 256):
        lens = [rng.randint(200, 2048) for _ in range(batch)]
        layouts = {"random": lens, "longest first": sorted(lens, reverse=True), "shortest first": sorted(lens),
                   "all at the mean": [sum(lens) // batch] * batch}
        for name, seq_lens in layouts.items():
            case = Case(name, seq_lens, [1] * batch, extra_table_columns=256)
            orders = {"search": None, "order=identity": torch.arange(batch, dtype=torch.int32, device="cuda"),
                      "order=ascending": case.seq_lens.argsort(stable=True).to(torch.int32)}
            row = []
            for order in orders.values():
                def run(case=case, order=order):
                    return paged_attention(case.query, case.kv_cache, case.query_start_loc, case.seq_lens,
                                           case.block_table, case.scale, 1, out=case.out, order=order)
                ms = bench_graph(run)
                row.append(f"{ms * 1e3:7.1f} us {case.kv_bytes() / (ms * 1e-3) / 1e12:5.2f} TB/s")
            print(f"b={batch:3d} {name:15s} " + " | ".join(row))
    print("(columns: " + ", ".join(orders) + "; tiles start from the last request)")
    if "--sweep" in sys.argv:
        sweep(rng)
    if "--small" in sys.argv:
        small(rng)


def sweep(rng: random.Random) -> None:
    """Decode tile settings at nano-like lengths, requests in the engine's order (ascending length), us per
    launch in a graph. Stages 1 (no software pipelining) leave room for more programs per SM."""
    cases = [Case(f"b={b}", [rng.randint(200, 2048) for _ in range(b)], [1] * b, extra_table_columns=256)
             for b in (64, 128, 208, 256)]
    print("sweep (BLOCK_N, warps, stages): " + ", ".join(c.name for c in cases))

    def run(c: Case) -> torch.Tensor:
        return paged_attention(c.query, c.kv_cache, c.query_start_loc, c.seq_lens, c.block_table, c.scale, 1,
                               out=c.out, order=c.seq_lens.argsort(stable=True).to(torch.int32))

    for block_n, warps, stages in [(128, 4, 2), (128, 4, 1), (128, 2, 1), (128, 8, 1), (64, 4, 2), (64, 4, 1),
                                   (64, 2, 1), (64, 2, 2), (256, 4, 1), (256, 8, 1), (32, 4, 3), (32, 2, 2),
                                   (128, 8, 2)]:
        triton_paged._launch_config = decode_config(block_n, warps, stages)
        triton_paged._decode_num_splits.cache_clear()
        try:
            times = [bench_graph(lambda c=c: run(c)) * 1e3 for c in cases]
            print(f"  ({block_n:3d}, {warps}, {stages}): " + " ".join(
                f"{t:7.1f} us {c.kv_bytes() / (t * 1e-6) / 1e12:4.2f} TB/s" for t, c in zip(times, cases)))
        except Exception as e:  # out of shared memory or registers
            print(f"  ({block_n:3d}, {warps}, {stages}): failed {type(e).__name__}")
    triton_paged._launch_config = BASE_CONFIG


def small(rng: random.Random) -> None:
    """Few requests: each (tile setting, split count) in us per launch (attention and reduction) in a graph;
    * marks the engine's split count."""
    cases = [Case(f"b={b}", [rng.randint(600, 2048) for _ in range(b)], [1] * b, extra_table_columns=256)
             for b in (8, 16, 24, 40, 64, 96)]
    settings = [(128, 4, 2), (64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 4)]
    for c in cases:
        order = c.seq_lens.argsort(stable=True).to(torch.int32)
        engine_splits = triton_paged.decode_num_splits(c.query, c.kv_cache, c.block_table)
        floor_us = c.kv_bytes() / 3.0e12 * 1e6
        print(f"{c.name}: floor at 3.0 TB/s {floor_us:.1f} us; (BLOCK_N, warps, stages) x splits 1..32")
        for block_n, warps, stages in settings:
            triton_paged._launch_config = decode_config(block_n, warps, stages)
            row = []
            for splits in (1, 2, 4, 8, 16, 32):
                def run(c=c, order=order, splits=splits):
                    return paged_attention(c.query, c.kv_cache, c.query_start_loc, c.seq_lens, c.block_table,
                                           c.scale, 1, out=c.out, order=order, num_splits=splits)
                try:
                    row.append(f"{bench_graph(run) * 1e3:6.1f}{'*' if splits == engine_splits else ' '}")
                except Exception as e:  # out of shared memory or registers
                    row.append(f"{type(e).__name__[:6]:>7}")
            print(f"  ({block_n:3d}, {warps}, {stages}): " + " ".join(row))
    triton_paged._launch_config = BASE_CONFIG


if __name__ == "__main__":
    main()
