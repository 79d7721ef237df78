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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from tokenmill import LLM, SamplingParams
    from tokenmill.entrypoints.cli import STARTED

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
    record = {"workload": f"latency-{args.input_len}-{args.output_len}", "model": model_name, "backend": "tokenmill",
              "input_len": args.input_len, "output_len": args.output_len,
              "ttft_ms": statistics.median(ttfts) * 1e3, "decode_tokens_per_s": statistics.median(decode_rates),
              "startup_to_first_token_s": startup, **spec_decode_record(llm), **base_record()}
    print_table([record], ["model", "input_len", "output_len", "ttft_ms", "decode_tokens_per_s",
                           "startup_to_first_token_s", *spec_columns(record), "device"])
    write_records([record], args.output_json)
    return 0
