"""Host (Python) time of `LLM.generate` for one long prompt and one new token, by phase, on the CPU: the
model's forward pass is replaced by empty outputs of the right shapes (a tiny random Llama with
Llama-3.1-8B's vocabulary), so what is timed is the engine around it. On the GPU the part before the
first kernel adds straight to time to first token.

    python benchmarks/host_phases.py [--prompt-len 4096] [--iters 50]

Prints milliseconds per generate for each phase (nested phases indented; they are part of the one above).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.presets import PRESETS, write_synthetic_tokenizer  # noqa: E402
from tokenmill.forward_context import get_forward_context  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dict(PRESETS["llama-3.1-8b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    path = os.path.join(tempfile.mkdtemp(), "tiny-llama")
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    write_synthetic_tokenizer(path, config["vocab_size"], config["bos_token_id"], config["eos_token_id"])
    llm = LLM(path, load_format="dummy", skip_tokenizer_init=True, max_model_len=args.prompt_len + 1, max_num_seqs=8,
              dtype="float32")
    model = llm.llm_engine.core.runner.model

    def empty_forward(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = get_forward_context().logits_rows
        return torch.empty(ids.shape[0] if rows is None else rows.shape[0], config["hidden_size"])

    model.forward = empty_forward
    model.compute_logits = lambda hidden: torch.zeros(hidden.shape[0], config["vocab_size"])
    totals: dict[str, float] = defaultdict(float)

    def timed(obj, name: str, label: str) -> None:
        inner = getattr(obj, name)

        @functools.wraps(inner)
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                totals[label] += time.perf_counter() - started
        setattr(obj, name, wrapper)

    engine = llm.llm_engine
    scheduler, runner = engine.core.scheduler, engine.core.runner
    phases = ((llm, "generate", "generate"), (engine, "add_request", "  add_request"),
              (engine, "step", "  engine step"), (scheduler, "schedule", "    schedule"),
              (scheduler.kv, "get_computed_blocks", "      prefix lookup (hashing)"),
              (scheduler.kv, "allocate_slots", "      allocate_slots"),
              (runner, "launch_step", "    launch_step"), (runner, "_prepare_inputs", "      prepare inputs"),
              (runner, "sample", "      sample"), (scheduler, "update_from_output", "    update"))
    for obj, name, label in phases:
        timed(obj, name, label)
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(0, 10000, size=args.prompt_len).tolist()}
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    totals.clear()
    for _ in range(args.iters):
        llm.reset_prefix_cache()
        llm.generate([prompt], params, use_tqdm=False)
    print(f"one {args.prompt_len}-token prompt, 1 new token, empty forward; ms per generate (mean of {args.iters})")
    for _, _, label in phases:
        print(f"{label:34s} {1e3 * totals[label] / args.iters:7.3f}")


if __name__ == "__main__":
    main()
