"""`tokenmill bench throughput`: offline generation of a whole workload, tokenmill or HF transformers."""

from __future__ import annotations

import argparse
import os
import time

from tokenmill.bench.common import Workload, base_record, make_workload, print_table, write_records
from tokenmill.bench.presets import model_path
from tokenmill.entrypoints.cli.engine_args import add_engine_args, engine_kwargs
from tokenmill.metrics import step_timer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("throughput", help="offline throughput on a workload (ignore_eos)")
    add_engine_args(parser)
    parser.add_argument("--workload", default="nano", choices=["nano", "fixed"])
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--backend", default="tokenmill", choices=["tokenmill", "hf"])
    parser.add_argument("--hf-batch-size", type=int, default=64, help="requests per padded HF generate call")
    parser.add_argument("--output-json", default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    workload = make_workload(args.workload, args.num_prompts, args.input_len, args.output_len)
    model_name, args.model = args.model, model_path(args.model)
    seconds = run_hf(args, workload) if args.backend == "hf" else run_tokenmill(args, workload)
    record = {"workload": workload.name, "model": model_name, "backend": args.backend,
              "num_requests": len(workload.prompts), "prompt_tokens": workload.num_prompt_tokens,
              "output_tokens": workload.num_output_tokens, "seconds": seconds,
              "output_tokens_per_s": workload.num_output_tokens / seconds,
              "total_tokens_per_s": (workload.num_prompt_tokens + workload.num_output_tokens) / seconds,
              **base_record()}
    if step_timer.ENABLED and args.backend == "tokenmill":
        record["step_phases"] = step_timer.summary()
        for name, row in record["step_phases"].items():
            print(f"step phase {name:<13} {row['seconds']:8.2f} s  {row['calls']:6d} calls  {row['mean_ms']:7.3f} ms")
    print_table([record], ["workload", "model", "backend", "num_requests", "seconds", "output_tokens_per_s",
                           "total_tokens_per_s", "device"])
    write_records([record], args.output_json)
    return 0


def run_tokenmill(args: argparse.Namespace, workload: Workload) -> float:
    from tokenmill import LLM, SamplingParams

    kwargs = engine_kwargs(args)
    if kwargs["max_model_len"] is None:
        kwargs["max_model_len"] = max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens))
    llm = LLM(**kwargs, skip_tokenizer_init=True)
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up: kernels compiled, caches touched
    step_timer.reset()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started

    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != workload.num_output_tokens:
        raise RuntimeError(f"generated {produced} tokens, the workload asks for {workload.num_output_tokens}")
    return seconds


def run_hf(args: argparse.Namespace, workload: Workload) -> float:
    """HF transformers `generate`, requests sorted by length and padded in batches; only the requested
    output tokens of each request are counted."""
    import torch
    import transformers

    from tokenmill.config import ModelConfig
    from tokenmill.loader import config_dtype, resolve_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_model(args.model)
    dtype = ModelConfig(dtype=args.dtype).resolve_dtype(config_dtype(source.hf_config), device)
    if args.load_format == "dummy":
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(source.hf_config, dtype=dtype)
    elif source.is_gguf:
        folder, name = os.path.split(source.path)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).to(device)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype).to(device)
    model.eval()
    order = sorted(range(len(workload.prompts)), key=lambda i: len(workload.prompts[i]))
    batches = [order[i:i + args.hf_batch_size] for i in range(0, len(order), args.hf_batch_size)]
    started = time.perf_counter()
    for batch in batches:
        prompts = [workload.prompts[i] for i in batch]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        new = max(workload.output_lens[i] for i in batch)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started
