"""Attention of one nano prefill step, piece by piece: the fresh prompts (lengths from the nano workload,
16,384 tokens in all) in one prefill-shaped launch, the decode rows that ride along in their own launch,
and both as the backend runs them; a single 4,096-token prompt for scale. Llama-3.1-8B shapes, bf16.

    python benchmarks/mixed_attention_bench.py [--sweep]     # on the GPU machine, about 20 s

--sweep also times the prompts-only launch and the single prompt under other prefill tile settings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_bench import BASE_CONFIG, PEAK_FLOPS, Case, prefill_config  # noqa: E402

from tokenmill.attention import triton_paged  # noqa: E402
from tokenmill.attention.triton_paged import paged_attention  # noqa: E402
from tokenmill.bench.common import make_workload  # noqa: E402


def timed(name: str, case: Case, flops: int, fn) -> None:
    ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    print(f"{name:44s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s  floor {flops / PEAK_FLOPS * 1e3:7.3f} ms")


def main() -> None:
    print(torch.cuda.get_device_name())
    prompts, total = [], 0
    for p in make_workload("nano", None, 0, 0).prompts:
        if total + len(p) > 16384:
            break
        prompts.append(len(p))
        total += len(p)
    decodes = [600] * 56
    mixed = Case(f"{len(prompts)} prompts + {len(decodes)} decodes", prompts + decodes, prompts + [1] * len(decodes))
    only = Case(f"{len(prompts)} prompts ({total} tokens)", prompts, prompts)
    single = Case("one 4096-token prompt", [4096], [4096])
    args = lambda c: (c.query, c.kv_cache, c.query_start_loc, c.seq_lens, c.block_table, c.scale)
    max_q = max(prompts)
    timed(only.name, only, only.flops(), lambda: paged_attention(*args(only), max_q, out=only.out))
    timed(single.name, single, single.flops(), lambda: paged_attention(*args(single), 4096, out=single.out))
    timed(mixed.name + ": one launch", mixed, mixed.flops(),
          lambda: paged_attention(*args(mixed), max_q, out=mixed.out))
    timed(mixed.name + ": prompts' launch", mixed, only.flops(),
          lambda: paged_attention(*args(mixed), max_q, out=mixed.out, min_q_len=2))
    timed(mixed.name + ": decodes' launch", mixed, mixed.flops() - only.flops(),
          lambda: paged_attention(*args(mixed), 1, out=mixed.out, num_splits=1, max_q_len=1))
    if "--sweep" in sys.argv:
        for rows, block_n, warps, stages in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3),
                                             (128, 64, 8, 4), (128, 32, 4, 3), (128, 32, 8, 4), (64, 64, 4, 3),
                                             (64, 128, 4, 3), (64, 32, 4, 3), (256, 64, 8, 3), (256, 32, 8, 3)]:
            triton_paged._launch_config = prefill_config(rows, block_n, warps, stages)
            try:
                timed(f"  rows {rows} BLOCK_N {block_n} warps {warps} stages {stages}: prompts", only, only.flops(),
                      lambda: paged_attention(*args(only), max_q, out=only.out))
                timed("      the same: single 4096", single, single.flops(),
                      lambda: paged_attention(*args(single), 4096, out=single.out))
            except Exception as e:  # a setting that does not fit
                print(f"  rows {rows} BLOCK_N {block_n} warps {warps} stages {stages}: failed {type(e).__name__}")
        triton_paged._launch_config = BASE_CONFIG


if __name__ == "__main__":
    main()
