"""Where the nano workload's time goes, step by step, against each step's roofline floor.

Runs nano (random weights) through `LLM.generate` as `bench throughput` does, with CUDA events queued
around every step's launch and sampling. The time between two steps' launch events is the device
timeline of the first step (kernels plus any idle gap before the next launch); it splits into forward
pass, idle before the sampling, sampling, idle before the next launch. Steps are grouped by shape; each
group prints its device seconds and its floor: the larger of FLOPs / peak and bytes / bandwidth, bytes
being the weights read once plus the KV cache each scheduled request attends over.

    python benchmarks/nano_timeline.py --model llama-3.1-8b     # on the GPU machine, about a minute
    python benchmarks/nano_timeline.py --structured --tokenizer .bench-tokenizer   # issue 6's workload
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from tokenmill.bench.common import make_workload  # noqa: E402
from tokenmill.bench.throughput import JSON_ARRAY_SCHEMA  # noqa: E402
from tokenmill.bench.presets import model_path  # noqa: E402

PEAK_FLOPS = 798e12  # bf16 dense GEMM, as measured on this H100 kind (issue 3)
PEAK_BYTES_PER_S = 3.0e12  # HBM3, a large device-to-device copy


def bucket(num_tokens: int, num_reqs: int) -> str:
    if num_tokens > num_reqs:
        return "prefill >= 2048" if num_tokens >= 2048 else "mixed < 2048"
    for top in (8, 32, 64, 128, 192):
        if num_reqs <= top:
            return f"decode <= {top}"
    return "decode > 192"


class Timeline:
    """CUDA events around every step's launch and sampling; a step's device time then splits into its
    forward pass, the idle gap before its sampling (a grammar's mask being filled), the sampling, and the
    idle gap before the next step's launch."""

    def __init__(self, engine, kv_bytes_per_token: int) -> None:
        self.engine, self.runner = engine, engine.core.runner
        self.kv_bytes_per_token = kv_bytes_per_token
        self.steps: list[dict] = []
        self.launch_step, self.sample = self.runner.launch_step, self.runner.sample
        self.runner.launch_step, self.runner.sample = self._launch, self._sample

    @staticmethod
    def _event() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _launch(self, so, *args, **kwargs):
        requests = self.engine.core.scheduler.requests  # num_computed_tokens already counts this step's
        context = pairs = 0
        for req_id, n in so.num_scheduled_tokens.items():
            total = requests[req_id].num_computed_tokens if req_id in requests else n
            context += total
            pairs += n * (total - n + (n + 1) / 2)
        step = {"start": self._event(), "tokens": so.total_num_scheduled_tokens, "reqs": len(so.num_scheduled_tokens),
                "kv_bytes": context * self.kv_bytes_per_token, "pairs": pairs}
        self.steps.append(step)
        pending = self.launch_step(so, *args, **kwargs)
        step["launched"], step["pending"] = self._event(), pending
        return pending

    def _sample(self, pending, *args, **kwargs):
        if not self.steps:  # a step the previous generate left in flight
            return self.sample(pending, *args, **kwargs)
        # sampled inside the launch (no grammar) or after it returned
        step = next((s for s in reversed(self.steps) if s.get("pending") is pending), self.steps[-1])
        step["sample_start"] = self._event()
        self.sample(pending, *args, **kwargs)
        step["sample_end"] = self._event()

    def close(self) -> list[dict]:
        self.runner.launch_step, self.runner.sample = self.launch_step, self.sample
        end = self._event()
        torch.cuda.synchronize()
        steps = [s for s in self.steps if s["tokens"]]
        for step, nxt in zip(steps, [s["start"] for s in steps[1:]] + [end]):
            step["seconds"] = step["start"].elapsed_time(nxt) / 1e3
            if "sample_end" in step:
                deferred = step["sample_start"].elapsed_time(step["launched"]) < 0  # sampled after launch returned
                forward_end = step["launched"] if deferred else step["sample_start"]
                step["forward"] = step["start"].elapsed_time(forward_end) / 1e3
                step["before_sample"] = forward_end.elapsed_time(step["sample_start"]) / 1e3
                step["sampling"] = step["sample_start"].elapsed_time(step["sample_end"]) / 1e3
                step["before_next"] = step["sample_end"].elapsed_time(nxt) / 1e3
        return steps


def run(llm, prompts, params, kv_bytes_per_token: int) -> tuple[float, list[dict], list]:
    if not llm.reset_prefix_cache():  # every run computes its prompts
        raise RuntimeError("the prefix cache could not be reset")
    timeline = Timeline(llm.llm_engine, kv_bytes_per_token)
    torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    return wall, timeline.close(), outputs


def report(title: str, steps: list[dict], weight_bytes: float, matmul_flops_per_token: float,
           attn_flops_per_pair: float) -> None:
    groups = defaultdict(lambda: defaultdict(float))
    for step in steps:
        flops = matmul_flops_per_token * step["tokens"] + attn_flops_per_pair * step["pairs"]
        floor = max(flops / PEAK_FLOPS, (weight_bytes + step["kv_bytes"]) / PEAK_BYTES_PER_S)
        g = groups[bucket(step["tokens"], step["reqs"])]
        for key, value in (("n", 1), ("seconds", step["seconds"]), ("floor", floor), ("tokens", step["tokens"]),
                           ("reqs", step["reqs"]), ("forward", step.get("forward", 0.0)),
                           ("before_sample", step.get("before_sample", 0.0)), ("sampling", step.get("sampling", 0.0)),
                           ("before_next", step.get("before_next", 0.0))):
            g[key] += value
    print(title)
    print(f"{'steps':<16} {'n':>5} {'device s':>9} {'floor s':>8} {'ms/step':>8} {'floor ms':>8} {'of floor':>8} "
          f"{'reqs':>6} | per step, ms: {'forward':>8} {'idle':>6} {'sample':>7} {'idle':>6}")
    total = defaultdict(float)
    for name in sorted(groups):
        g = groups[name]
        for key in ("n", "seconds", "floor"):
            total[key] += g[key]
        n = g["n"]
        print(f"{name:<16} {int(n):5d} {g['seconds']:9.3f} {g['floor']:8.3f} {1e3 * g['seconds'] / n:8.2f} "
              f"{1e3 * g['floor'] / n:8.2f} {g['floor'] / g['seconds']:8.1%} {g['reqs'] / n:6.0f} | "
              f"{'':14}{1e3 * g['forward'] / n:8.2f} {1e3 * g['before_sample'] / n:6.2f} "
              f"{1e3 * g['sampling'] / n:7.2f} {1e3 * g['before_next'] / n:6.2f}")
    print(f"{'all':<16} {int(total['n']):5d} {total['seconds']:9.3f} {total['floor']:8.3f} {'':8} {'':8} "
          f"{total['floor'] / total['seconds']:8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--structured", action="store_true",
                        help="every request constrained by the throughput bench's JSON schema, then the same "
                             "requests unconstrained at the lengths reached (needs --tokenizer)")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()

    workload = make_workload("nano", None, 0, 0)
    llm = LLM(model_path(args.model), load_format="dummy", skip_tokenizer_init=not args.structured,
              tokenizer=args.tokenizer, max_model_len=max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens)))
    runner = llm.llm_engine.core.runner
    config = runner.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    embed = runner.model.model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters()) - embed.numel() * embed.element_size()
    if getattr(runner.model, "tie_word_embeddings", False):
        weight_bytes += embed.numel() * embed.element_size()  # the LM head reads it
    costs = (weight_bytes, 2 * weight_bytes / embed.element_size(), 4 * config.num_attention_heads * head_dim * config.num_hidden_layers)
    kv_bytes_per_token = runner.kv_bytes_per_block() // runner.block_size

    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    constraint = StructuredOutputsParams(json=JSON_ARRAY_SCHEMA) if args.structured else None
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True, structured_outputs=constraint)
              for n in workload.output_lens]
    llm.generate(prompts[:2], [params[0], SamplingParams(max_tokens=8, ignore_eos=True)], use_tqdm=False)
    wall, steps, outputs = run(llm, prompts, params, kv_bytes_per_token)
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    label = "constrained" if args.structured else "nano"
    report(f"{args.model} {label}: {len(steps)} steps, wall {wall:.2f} s, {sum(lengths) / wall:.0f} output tok/s",
           steps, *costs)
    if args.structured:
        free = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max(1, n), ignore_eos=True) for n in lengths]
        free_wall, free_steps, _ = run(llm, prompts, free, kv_bytes_per_token)
        report(f"{args.model} same lengths unconstrained: {len(free_steps)} steps, wall {free_wall:.2f} s, "
               f"{sum(lengths) / free_wall:.0f} output tok/s; constrained/unconstrained {free_wall / wall:.1%}",
               free_steps, *costs)


if __name__ == "__main__":
    main()
