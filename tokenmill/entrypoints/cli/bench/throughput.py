"""`tokenmill bench throughput`: offline generation of a whole workload, tokenmill or HF transformers."""

from __future__ import annotations

import argparse
import os
import time

from tokenmill.entrypoints.cli.bench.common import (
    Workload,
    base_record,
    make_workload,
    phase,
    print_table,
    spec_columns,
    spec_decode_record,
    write_records,
)
from tokenmill.entrypoints.cli.bench.presets import model_path
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
    parser.add_argument("--structured", default="none", choices=["none", "json-array"],
                        help="constrain every request with a JSON schema (needs a real --tokenizer); then run the "
                             "same requests unconstrained, each to the length its constrained run reached")
    parser.add_argument("--output-json", default=None)
    parser.set_defaults(func=run)


# Unbounded, so constrained requests still run to their workload lengths.
JSON_ARRAY_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24}, "ok": {"type": "boolean"}},
    "required": ["id", "name", "ok"], "additionalProperties": False}}
FIFTY_PROPERTIES_SCHEMA = {"type": "object",
                           "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"][i % 3]}
                                          for i in range(50)},
                           "required": [f"field_{i}" for i in range(50)], "additionalProperties": False}


def run(args: argparse.Namespace) -> int:
    workload = make_workload(args.workload, args.num_prompts, args.input_len, args.output_len)
    model_name, args.model = args.model, model_path(args.model)
    extra: dict = {}
    if args.backend == "hf":
        seconds, output_tokens = run_hf(args, workload), workload.num_output_tokens
    else:
        seconds, output_tokens = run_tokenmill(args, workload, extra)
    record = {"workload": workload.name, "model": model_name, "backend": args.backend,
              "num_requests": len(workload.prompts), "prompt_tokens": workload.num_prompt_tokens,
              "output_tokens": output_tokens, "seconds": seconds, "output_tokens_per_s": output_tokens / seconds,
              "total_tokens_per_s": (workload.num_prompt_tokens + output_tokens) / seconds, **extra,
              **base_record()}
    if step_timer.ENABLED and args.backend == "tokenmill":
        record.setdefault("step_phases", step_timer.summary())
        for name, row in record["step_phases"].items():
            print(f"step phase {name:<13} {row['seconds']:8.2f} s  {row['calls']:6d} calls  {row['mean_ms']:7.3f} ms")
    structured_columns = (["unconstrained_output_tokens_per_s", "structured_ratio"] if "structured_ratio" in record
                          else [])
    print_table([record], ["workload", "model", "backend", "num_requests", "seconds", "output_tokens_per_s",
                           *structured_columns, "total_tokens_per_s", *spec_columns(record), "device"])
    write_records([record], args.output_json)
    return 0


def run_tokenmill(args: argparse.Namespace, workload: Workload, extra: dict) -> tuple[float, int]:
    """(seconds, output tokens produced); `extra` gets structured-output measurements."""
    from tokenmill import LLM, SamplingParams, StructuredOutputsParams

    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_model_len", max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens)))
    structured = args.structured != "none"
    with phase("engine start-up"):
        llm = LLM(**kwargs, skip_tokenizer_init=not structured)
    constraint = StructuredOutputsParams(json=JSON_ARRAY_SCHEMA) if structured else None
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True,
                             structured_outputs=constraint) for n in workload.output_lens]
    if structured:  # the compile runs on the core's grammar thread; this times it cold
        started = time.perf_counter()
        llm.llm_engine.core.structured.request(StructuredOutputsParams(json=FIFTY_PROPERTIES_SCHEMA)).future.result()
        extra.update(structured=args.structured, compile_ms_50_properties=1e3 * (time.perf_counter() - started))
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    # warm-up: kernels compiled (with a grammar's mask and without, for the structured comparison)
    warm_up = params[:2] if not structured else [params[0], SamplingParams(max_tokens=8, ignore_eos=True)]
    with phase("warm-up requests"):
        llm.generate(prompts[:2], warm_up, use_tqdm=False)
    with phase(f"timed run: {len(prompts)} requests"):
        seconds, lengths = _timed_generate(llm, prompts, params)
        extra.update(spec_decode_record(llm))
    produced = sum(lengths)
    if structured:
        # A grammar may end a request early, and fewer requests per step means fewer tokens per second
        # whatever the masking costs: the peer is the same requests unconstrained, each to the same length.
        phases = step_timer.summary()
        free = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max(1, n), ignore_eos=True) for n in lengths]
        with phase(f"timed run, unconstrained: {len(prompts)} requests"):
            free_seconds, free_lengths = _timed_generate(llm, prompts, free)
        extra.update(unconstrained_output_tokens_per_s=sum(free_lengths) / free_seconds,
                     structured_ratio=(produced / seconds) / (sum(free_lengths) / free_seconds))
        if step_timer.ENABLED:
            extra["step_phases"] = phases  # the constrained run's
    elif produced != workload.num_output_tokens:
        raise RuntimeError(f"generated {produced} tokens, the workload asks for {workload.num_output_tokens}")
    return seconds, produced


def _timed_generate(llm, prompts: list[dict], params: list) -> tuple[float, list[int]]:
    # Every timed run computes its prompts: none left cached by the warm-up or by the run before it.
    if not llm.reset_prefix_cache():
        raise RuntimeError("the prefix cache could not be reset: blocks are still held")
    step_timer.reset()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started, [len(o.outputs[0].token_ids) for o in outputs]


def run_hf(args: argparse.Namespace, workload: Workload) -> float:
    """HF transformers `generate`, requests sorted by length and padded in batches; only the requested
    output tokens of each request are counted."""
    import torch
    import transformers

    from tokenmill.config import DeviceInfo, checkpoint_dtype, resolve_dtype
    from tokenmill.source import resolve_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_model(args.model)
    info = DeviceInfo(device.type, supports_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported())
    dtype = getattr(torch, resolve_dtype(args.dtype or "auto", checkpoint_dtype(source.hf_config), info))
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
