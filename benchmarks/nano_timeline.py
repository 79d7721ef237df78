"""Where the nano workload's time goes, step by step, against each step's roofline floor.

Runs nano (random weights) through the engine's step loop as `bench throughput` does, with a CUDA event
queued before every step's launch. The time between two steps' events is the device timeline of the
first step (kernels plus any idle gap before the next launch). Steps are grouped by shape; each group
prints its device seconds and its floor: the larger of FLOPs / peak and bytes / bandwidth, bytes being
the weights read once plus the KV cache each scheduled request attends over.

    python benchmarks/nano_timeline.py --model llama-3.1-8b     # on the GPU machine, about a minute
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.common import make_workload  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    args = parser.parse_args()

    workload = make_workload("nano", None, 0, 0)
    llm = LLM(model_path(args.model), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens)))
    engine, runner = llm.llm_engine, llm.llm_engine.core.runner
    config = runner.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    embed = runner.model.model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters()) - embed.numel() * embed.element_size()
    if getattr(runner.model, "tie_word_embeddings", False):
        weight_bytes += embed.numel() * embed.element_size()  # the LM head reads it
    matmul_flops_per_token = 2 * weight_bytes / embed.element_size()
    kv_bytes_per_token = runner.kv_bytes_per_block() // runner.block_size
    attn_flops_per_pair = 4 * config.num_attention_heads * head_dim * config.num_hidden_layers

    steps = []  # (event, num_tokens, num_reqs, kv_bytes, attention pairs)
    launch_step = runner.launch_step

    def timed_launch(so, *a, **k):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        requests = engine.core.scheduler.requests  # num_computed_tokens already counts this step's
        context = pairs = 0
        for req_id, n in so.num_scheduled_tokens.items():
            total = requests[req_id].num_computed_tokens if req_id in requests else n
            context += total
            pairs += n * (total - n + (n + 1) / 2)
        steps.append((event, so.total_num_scheduled_tokens, len(so.num_scheduled_tokens), context * kv_bytes_per_token, pairs))
        return launch_step(so, *a, **k)

    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    llm.generate([{"prompt_token_ids": workload.prompts[0]}], params[0], use_tqdm=False)
    runner.launch_step = timed_launch
    for i, (prompt, p) in enumerate(zip(workload.prompts, params)):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, p)
    torch.cuda.synchronize()
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    runner.launch_step = launch_step

    groups = defaultdict(lambda: [0, 0.0, 0.0, 0, 0])  # steps, device s, floor s, tokens, requests
    nexts = [s[0] for s in steps[1:]] + [end]
    for (event, num_tokens, num_reqs, kv_bytes, pairs), nxt in zip(steps, nexts):
        if not num_tokens:
            continue
        seconds = event.elapsed_time(nxt) / 1e3
        flops = matmul_flops_per_token * num_tokens + attn_flops_per_pair * pairs
        floor = max(flops / PEAK_FLOPS, (weight_bytes + kv_bytes) / PEAK_BYTES_PER_S)
        g = groups[bucket(num_tokens, num_reqs)]
        g[0] += 1; g[1] += seconds; g[2] += floor; g[3] += num_tokens; g[4] += num_reqs
    print(f"{args.model} nano: {len(steps)} steps, wall {wall:.2f} s, "
          f"{sum(workload.output_lens) / wall:.0f} output tok/s")
    print(f"{'steps':<18} {'n':>5} {'device s':>9} {'floor s':>8} {'ms/step':>8} {'floor ms':>9} {'of floor':>8} "
          f"{'tok/step':>8} {'reqs/step':>9}")
    total = [0, 0.0, 0.0]
    for name in sorted(groups):
        n, sec, floor, tokens, reqs = groups[name]
        total = [total[0] + n, total[1] + sec, total[2] + floor]
        print(f"{name:<18} {n:5d} {sec:9.3f} {floor:8.3f} {1e3 * sec / n:8.2f} {1e3 * floor / n:9.2f} "
              f"{floor / sec:8.1%} {tokens / n:8.0f} {reqs / n:9.1f}")
    print(f"{'all':<18} {total[0]:5d} {total[1]:9.3f} {total[2]:8.3f} {'':8} {'':9} {total[2] / total[1]:8.1%}")


if __name__ == "__main__":
    main()
