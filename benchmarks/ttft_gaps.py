"""Where time to first token goes beyond the kernels: one 4096-token prompt (random-weight Llama-3.1-8B)
through `LLM.generate` under the PyTorch profiler, on one timeline: host time before the first kernel,
the kernels (their sum and the device's busy span), idle gaps between kernels (with the host calls that
ran during each), and host time after the last kernel.

    python benchmarks/ttft_gaps.py      # on the GPU machine, about a minute

Then the host's share alone: the same request with the model's forward replaced by empty outputs of
the right shapes, timed and profiled (cProfile, by own time).
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.presets import model_path  # noqa: E402
from tokenmill.forward_context import get_forward_context  # noqa: E402

T = 4096


def main() -> None:
    llm = LLM(model_path("llama-3.1-8b"), load_format="dummy", skip_tokenizer_init=True, max_model_len=T + 1,
              max_num_seqs=8)
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(0, 10000, size=T).tolist()}
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for _ in range(3):
        llm.reset_prefix_cache()
        llm.generate([prompt], one, use_tqdm=False)
    llm.reset_prefix_cache()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("generate"):
            llm.generate([prompt], one, use_tqdm=False)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))["traceEvents"]
    span = next(e for e in trace if e.get("name") == "generate" and e.get("ph") == "X")
    g0, g1 = span["ts"], span["ts"] + span["dur"]
    kernels = sorted((e for e in trace if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"
                      and g0 <= e["ts"] <= g1), key=lambda e: e["ts"])
    runtime = [e for e in trace if e.get("cat") == "cuda_runtime" and e.get("ph") == "X"]
    busy = sum(e["dur"] for e in kernels)
    first, last = kernels[0]["ts"], max(e["ts"] + e["dur"] for e in kernels)
    print(f"generate {span['dur'] / 1e3:.2f} ms: host before first kernel {(first - g0) / 1e3:.2f} ms, "
          f"kernels {busy / 1e3:.2f} ms in a {(last - first) / 1e3:.2f} ms span ({len(kernels)} kernels), "
          f"after last kernel {(g1 - last) / 1e3:.2f} ms")
    gaps, end, prev = [], kernels[0]["ts"], kernels[0]
    for e in kernels[1:]:
        if e["ts"] - end > 20:
            gaps.append((e["ts"] - end, end, e["ts"], prev["name"], e["name"]))
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e
    print(f"idle gaps > 20 us: {len(gaps)}, {sum(g[0] for g in gaps) / 1e3:.2f} ms in all; largest:")
    for dur, a, b, before, after in sorted(gaps, reverse=True)[:8]:
        calls = sorted({r["name"] for r in runtime if r["ts"] < b and r["ts"] + r["dur"] > a})
        print(f"  {dur / 1e3:6.2f} ms after {before[:50]!r} before {after[:50]!r}; host: {', '.join(calls)[:120]}")
    host_only(llm, prompt, one)
    by_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    print(f"{'kernel':<80} {'ms':>7} {'calls':>5}")
    for name, (dur, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"{name[:80]:<80} {dur / 1e3:7.2f} {n:5d}")


def host_only(llm, prompt, params) -> None:
    model = llm.llm_engine.core.runner.model
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    forward, logits = model.forward, model.compute_logits
    def empty_forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # the rows the model would return
        rows = get_forward_context().logits_rows
        return torch.empty(ids.shape[0] if rows is None else rows.shape[0], hidden, device="cuda", dtype=torch.bfloat16)

    model.forward = empty_forward
    model.compute_logits = lambda h: torch.zeros(h.shape[0], vocab, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(10):
        llm.reset_prefix_cache()
        torch.cuda.synchronize()
        started = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        times.append(1e3 * (time.perf_counter() - started))
    llm.reset_prefix_cache()
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate([prompt], params, use_tqdm=False)
    profiler.disable()
    model.forward, model.compute_logits = forward, logits
    print(f"host only (empty forward): {sorted(times)[len(times) // 2]:.2f} ms median of {len(times)}")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
