"""Where a step's GPU time goes: the nano workload driven step by step, with the PyTorch profiler over a
window of steps; prints the kernels by total device time and the mean device time per step.

Usage (device machine, repo root): python3 benchmarks/profile_steps.py --model qwen3-0.6b [--start 300 --steps 20]
  one request instead of nano: --input-len 4096 --output-len 1 --start 0 --steps 1 (its prefill),
  --input-len 128 --output-len 512 --start 100 --steps 20 (batch-1 decode)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill import LLM, SamplingParams
from tokenmill.bench.common import make_workload
from tokenmill.bench.presets import model_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--start", type=int, default=300, help="steps run before the profiled window")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--input-len", type=int, default=None, help="one request of this prompt length")
    parser.add_argument("--output-len", type=int, default=512)
    args = parser.parse_args()

    if args.input_len is None:
        workload = make_workload("nano", None, 0, 0)
    else:
        workload = make_workload("fixed", 1, args.input_len, args.output_len)
    max_len = max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens))
    llm = LLM(model_path(args.model), load_format="dummy", skip_tokenizer_init=True, max_model_len=max_len,
              enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
              enable_prefix_caching=False)  # the warm-up must not turn the profiled prefill into a cache hit
    engine = llm.llm_engine
    llm.generate([{"prompt_token_ids": workload.prompts[0]}], SamplingParams(max_tokens=8), use_tqdm=False)
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        engine.add_request(str(i), {"prompt_token_ids": prompt},
                           SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True))
    for _ in range(args.start):
        engine.step()
    torch.cuda.synchronize()
    running = len(engine.core.scheduler.running)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    print(f"{args.model}: steps {args.start}..{args.start + args.steps}, {running} running; wall {1e3 * wall / args.steps:.2f} "
          f"ms/step (profiled), device busy {device_us / 1e3 / args.steps:.2f} ms/step")
    rows = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    print(f"{'kernel':<90} {'ms/step':>8} {'calls/step':>10} {'share':>6}")
    for e in rows[:args.top]:
        print(f"{e.key[:90]:<90} {e.self_device_time_total / 1e3 / args.steps:8.3f} "
              f"{e.count / args.steps:10.1f} {e.self_device_time_total / device_us:6.1%}")
    while engine.has_unfinished_requests():
        engine.step()


if __name__ == "__main__":
    main()
