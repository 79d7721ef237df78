"""vLLM-named engine flags shared by every subcommand that starts an engine."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tokenmill.config import DTYPE_NAMES, EXECUTOR_BACKENDS, KV_CACHE_DTYPES
from tokenmill.loader.registry import LOAD_FORMATS


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    if model_positional:
        parser.add_argument("model", nargs="?", default="default",
                            help="HF directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    else:
        parser.add_argument("--model", default="default", help="HF directory, .gguf file or hub id")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--dtype", choices=["auto", *DTYPE_NAMES])
    parser.add_argument("--max-model-len", type=int, help="default: the model's max_position_embeddings")
    parser.add_argument("--max-num-seqs", type=int, help="default: 256")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        help="tokens per step (default: 8192 for serve; offline, 16384 on GPUs of 70 GiB or more, "
                             "else 8192)")
    parser.add_argument("--block-size", type=int, help="default: 16")
    parser.add_argument("--gpu-memory-utilization", type=float, help="default: 0.9")
    parser.add_argument("--kv-cache-memory-bytes", type=int)
    parser.add_argument("--seed", type=int, help="default: 0")
    parser.add_argument("--load-format", choices=LOAD_FORMATS)
    parser.add_argument("--enforce-eager", action="store_true", default=None)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, help="default: on")
    parser.add_argument("--kv-offload-size", type=float,
                        help="GiB of host memory that keeps KV blocks evicted from the device (default: 0, off)")
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, help="default: on")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        help="schedule the next step while the current one runs on the device (default: on)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, help="default: 1")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int,
                        help="default: 1; the model's layers in this many stages, one rank group each")
    parser.add_argument("--data-parallel-size", "-dp", type=int,
                        help="default: 1; engine cores behind the server, each of -tp x -pp ranks")
    parser.add_argument("--enable-expert-parallel", "-ep", action=argparse.BooleanOptionalAction,
                        help="default: off; MoE layers' experts spread whole over the -tp ranks (each holds 1/tp of "
                             "them) instead of every expert split over them, and with -dp over every core's ranks "
                             "(-dp x -tp, tokens exchanged all-to-all); attention stays tensor-parallel")
    parser.add_argument("--distributed-executor-backend", choices=EXECUTOR_BACKENDS,
                        help="uni: one rank in the engine's process; mp: a process per further rank (the default "
                             "above one rank); ray: a Ray actor per further rank (RAY_ADDRESS's cluster, else a "
                             "local one)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--quantization", "-q",
                        help="default: the checkpoint's own format (awq, gptq, fp8, compressed-tensors, from its "
                             "config; a GGUF file's kept 4-bit on the CPU); fp8 quantizes a 16-bit checkpoint at "
                             "load; gguf keeps a GGUF file's 4-bit weights (on a GPU too)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                        help="auto: the model's dtype (default); fp8 (= fp8_e4m3): e4m3, twice the tokens")
    parser.add_argument("--calculate-kv-scales", action="store_true", default=None,
                        help="an FP8 cache's k and v scales from the first batch (default: the checkpoint's, else 1.0)")
    parser.add_argument("--speculative-config",
                        help='speculative decoding, as JSON: e.g. \'{"method": "ngram", "num_speculative_tokens": 3, '
                             '"prompt_lookup_max": 4}\' (vLLM\'s keys; ngram is the method run so far)')
    parser.add_argument("--generation-config",
                        help="sampling defaults: 'auto' (the model's generation_config.json; the default), 'vllm' "
                             "(none: SamplingParams' own), or a folder holding a generation_config.json")
    parser.add_argument("--override-generation-config", type=json.loads,
                        help='JSON overriding the generation config\'s fields, e.g. \'{"temperature": 0.5}\'')


ENGINE_ARG_NAMES = ("model", "tokenizer", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                    "block_size", "gpu_memory_utilization", "kv_cache_memory_bytes", "seed", "load_format",
                    "enforce_eager", "enable_prefix_caching", "kv_offload_size", "enable_chunked_prefill",
                    "async_scheduling", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                    "enable_expert_parallel", "distributed_executor_backend", "device",
                    "generation_config", "override_generation_config", "quantization", "kv_cache_dtype",
                    "calculate_kv_scales", "speculative_config")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags given; one left out takes the engine config's default (config.py)."""
    return {name: getattr(args, name) for name in ENGINE_ARG_NAMES if getattr(args, name) is not None}


DEFAULT_MAX_TOKENS = 128  # the CLI's, where neither the flag nor the model's generation config sets one


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Sampling flags; one left out takes the model's default (its generation config), else SamplingParams',
    as a request's field left out does."""
    parser.add_argument("--max-tokens", type=int, help=f"default: {DEFAULT_MAX_TOKENS}")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=None)


def sampling_kwargs(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams' arguments: the flags given over the model's `defaults`."""
    given = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 min_p=args.min_p, seed=args.sampling_seed, stop=args.stop)
    return {"max_tokens": DEFAULT_MAX_TOKENS, **defaults, **{k: v for k, v in given.items() if v is not None}}
