"""`tokenmill bench latency`: one request at a time: time to first token and batch-1 decode speed."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tokenmill.entrypoints.cli.bench.common import (
    base_record,
    phase,
    print_table,
    spec_columns,
    spec_decode_record,
    write_records,
)
from tokenmill.entrypoints.cli.bench.presets import model_path
from tokenmill.entrypoints.cli.engine_args import add_engine_args, engine_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("latency", help="batch-1 decode tok/s and time to first token")
    add_engine_args(parser)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="after the timed runs, one more under torch.profiler: its device kernels by time (and "
                             "their launches per decode step) written to FILE and printed")
    parser.set_defaults(func=run)


def profile_generation(llm, prompt: dict, params, num_decode_steps: int, path: str) -> None:
    """One generation under torch.profiler: the device kernels (CPU ops where there is no GPU) by their total
    time, with the launches per decode step, to `path` and stdout. The engine runs in this process (one rank),
    so the profiler sees its kernels, those replayed in CUDA graphs too."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    llm.reset_prefix_cache()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        llm.generate([prompt], params, use_tqdm=False)
    averages = prof.key_averages()
    on_device = [e for e in averages if e.device_type.name == "CUDA"] or list(averages)

    def self_us(event) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    launches, total_us = sum(e.count for e in on_device), sum(self_us(e) for e in on_device)
    lines = [f"{'kernel' if on_gpu else 'op':80s} {'calls':>7s} {'per step':>8s} {'total ms':>9s} {'share':>6s}"]
    for e in sorted(on_device, key=self_us, reverse=True)[:40]:
        lines.append(f"{e.key[:80]:80s} {e.count:7d} {e.count / num_decode_steps:8.1f} {self_us(e) / 1e3:9.2f} "
                     f"{self_us(e) / max(total_us, 1):6.1%}")
    lines.append(f"{launches} launches, {launches / num_decode_steps:.0f} per decode step; "
                 f"{total_us / 1e3:.1f} ms in them over {num_decode_steps} decode steps")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from tokenmill import LLM, SamplingParams
    from tokenmill.entrypoints.cli import STARTED

    if args.profile and (args.tensor_parallel_size or 1) * (args.pipeline_parallel_size or 1) > 1:
        raise SystemExit("bench latency --profile profiles one rank (the others run in processes of their own); "
                         "run it without tensor or pipeline parallelism")
    model_name, args.model = args.model, model_path(args.model)
    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_model_len", args.input_len + args.output_len)
    with phase("engine start-up"):
        llm = LLM(**kwargs, skip_tokenizer_init=True)
    rng = np.random.default_rng(0)
    prompt = {"prompt_token_ids": rng.integers(0, 10000, size=args.input_len).tolist()}
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([prompt], first, use_tqdm=False)
    startup = time.perf_counter() - STARTED
    llm.reset_prefix_cache()
    ttfts, decode_rates = [], []
    full = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_iters):
        llm.reset_prefix_cache()  # every iteration computes its prompt
        t0 = time.perf_counter()
        llm.generate([prompt], first, use_tqdm=False)
        ttft = time.perf_counter() - t0
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        llm.generate([prompt], full, use_tqdm=False)
        total = time.perf_counter() - t0
        ttfts.append(ttft)
        decode_rates.append((args.output_len - 1) / max(total - ttft, 1e-9))
        print(f"bench: iteration {i + 1} of {args.num_iters}: TTFT {ttft * 1e3:.1f} ms, "
              f"{decode_rates[-1]:.1f} tok/s", file=sys.stderr, flush=True)
    if args.profile:
        profile_generation(llm, prompt, full, args.output_len - 1, args.profile)
    record = {"workload": f"latency-{args.input_len}-{args.output_len}", "model": model_name, "backend": "tokenmill",
              "input_len": args.input_len, "output_len": args.output_len,
              "ttft_ms": statistics.median(ttfts) * 1e3, "decode_tokens_per_s": statistics.median(decode_rates),
              "startup_to_first_token_s": startup, **spec_decode_record(llm), **base_record()}
    print_table([record], ["model", "input_len", "output_len", "ttft_ms", "decode_tokens_per_s",
                           "startup_to_first_token_s", *spec_columns(record), "device"])
    write_records([record], args.output_json)
    return 0
