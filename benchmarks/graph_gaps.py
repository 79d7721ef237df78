"""How much of a decode graph's replay is the device idle between kernels? The nano workload is driven
step by step to a few points of its run; at each, the decode graph the step used is replayed alone: timed
with CUDA events, then under the profiler, whose kernel intervals give the busy time, the gaps between
consecutive kernels and the time per kernel family.

Usage (device machine, repo root): python3 benchmarks/graph_gaps.py --model llama-3.1-8b [--at 300 700 900]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill import LLM, SamplingParams
from tokenmill.bench.common import make_workload
from tokenmill.bench.presets import model_path

FAMILIES = [("attention", ("_paged_attention", "_reduce_splits")), ("gemm", ("nvjet", "gemm", "splitK", "cutlass")),
            ("norm", ("_rms_norm",)), ("rope", ("_qk_norm_rope", "_rope")), ("silu", ("_silu",))]


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--at", type=int, nargs="+", default=[300, 700, 900], help="steps before each measurement")
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()

    workload = make_workload("nano", None, 0, 0)
    max_len = max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens))
    llm = LLM(model_path(args.model), load_format="dummy", skip_tokenizer_init=True, max_model_len=max_len,
              enable_prefix_caching=False)
    engine = llm.llm_engine
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        engine.add_request(str(i), {"prompt_token_ids": prompt},
                           SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True))
    runner = engine.core.runner
    done = 0
    print(f"{'step':>5} {'reqs':>5} {'graph':>5} {'replay ms':>9} {'busy ms':>8} {'gaps ms':>8} {'kernels':>7} "
          f"{'gap us':>7}  per family (ms)")
    for at in sorted(args.at):
        while done < at and engine.has_unfinished_requests():
            engine.step()
            done += 1
        torch.cuda.synchronize()
        running = len(engine.core.scheduler.running)
        size = runner.graphs.padded_size(running)
        graph = runner.graphs.graphs[size]
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / args.replays
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.replays):
                graph.replay()
            torch.cuda.synchronize()
        kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
        per_replay = len(kernels) // args.replays
        busy = sum(e - s for s, e, _ in kernels) / args.replays / 1e3
        # Gaps inside a replay: between consecutive kernels, leaving out the boundary between replays.
        gaps = [kernels[i + 1][0] - kernels[i][1] for i in range(len(kernels) - 1) if (i + 1) % per_replay]
        by_family = collections.Counter()
        for s, e, name in kernels:
            by_family[family(name)] += (e - s) / args.replays / 1e3
        fams = " ".join(f"{k}={v:.2f}" for k, v in sorted(by_family.items(), key=lambda kv: -kv[1]))
        print(f"{at:5d} {running:5d} {size:5d} {replay_ms:9.3f} {busy:8.3f} {sum(gaps) / args.replays / 1e3:8.3f} "
              f"{per_replay:7d} {sum(gaps) / max(len(gaps), 1):7.2f}  {fams}", flush=True)
    while engine.has_unfinished_requests():
        engine.step()


if __name__ == "__main__":
    main()
