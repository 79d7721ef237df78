"""`tokenmill bench prefix`: time to first token on a shared prefix: cold, cached on the device, and
(with --kv-offload-size) cached only in the host tier."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tokenmill.entrypoints.cli.bench.common import base_record, phase, print_table, write_records
from tokenmill.entrypoints.cli.bench.presets import model_path
from tokenmill.entrypoints.cli.engine_args import add_engine_args, engine_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prefix", help="TTFT with a shared prefix: cold, device hit, host-tier hit")
    add_engine_args(parser)
    parser.add_argument("--prefix-len", type=int, default=4000)
    parser.add_argument("--suffix-len", type=int, default=100, help="new prompt tokens after the prefix")
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--output-json", default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams

    model_name, args.model = args.model, model_path(args.model)
    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_model_len", args.prefix_len + args.suffix_len + 1)
    with phase("engine start-up"):
        llm = LLM(**kwargs, skip_tokenizer_init=True)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 10000, size=args.prefix_len).tolist()
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def ttft(prompt: list[int]) -> float:
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)
        return time.perf_counter() - started

    def suffix() -> list[int]:
        return rng.integers(10000, 20000, size=args.suffix_len).tolist()

    ttft(prefix + suffix())  # warm-up: kernels compiled for these shapes
    cold, cached, host = [], [], []
    for _ in range(args.num_iters):
        llm.reset_prefix_cache()
        cold.append(ttft(prefix + suffix()))
        cached.append(ttft(prefix + suffix()))
        if (args.kv_offload_size or 0) > 0:
            host.append(_host_hit_ttft(llm, ttft, prefix + suffix(), rng, kwargs["max_model_len"], one))
    record = {"workload": f"prefix-{args.prefix_len}+{args.suffix_len}", "model": model_name, "backend": "tokenmill",
              "cold_ttft_ms": 1e3 * statistics.median(cold), "cached_ttft_ms": 1e3 * statistics.median(cached),
              **base_record()}
    record["cached_speedup"] = record["cold_ttft_ms"] / record["cached_ttft_ms"]
    columns = ["model", "workload", "cold_ttft_ms", "cached_ttft_ms", "cached_speedup"]
    if host:
        record["host_tier_ttft_ms"] = 1e3 * statistics.median(host)
        record["host_tier_speedup"] = record["cold_ttft_ms"] / record["host_tier_ttft_ms"]
        columns += ["host_tier_ttft_ms", "host_tier_speedup"]
    print_table([record], columns + ["device"])
    write_records([record], args.output_json)
    return 0


def _host_hit_ttft(llm, ttft, prompt: list[int], rng, max_model_len: int, params) -> float:
    """Pushes the prefix out of the device pool with unrelated prompts, then times a request whose
    prefix only the host tier still holds."""
    core = llm.llm_engine.core
    kv = core.scheduler.kv
    filler_len = max_model_len - 1
    for _ in range(-(-kv.pool.num_blocks * kv.block_size // filler_len) + 1):
        llm.generate([{"prompt_token_ids": rng.integers(20000, 30000, size=filler_len).tolist()}],
                     params, use_tqdm=False)
    before = core.stats().prefix_cache_host_hits
    seconds = ttft(prompt)
    if core.stats().prefix_cache_host_hits <= before:
        raise RuntimeError("the prefix was not served from the host tier (is --kv-offload-size large enough?)")
    return seconds
