"""Time to first token of a 4096-token prompt (random-weight Llama-3.1-8B), with and without the dense
attention path for long fresh prompts, alternating in one engine so both see the same GPU state; then
torch's fused attention backends on the prefill's own shapes (q/k/v as views of one packed projection).

    python benchmarks/dense_prefill_ab.py      # on the GPU machine, about a minute
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.attention import triton_paged  # noqa: E402
from tokenmill.bench.presets import model_path  # noqa: E402

T, H, KVH, D = 4096, 32, 8, 128


def kernels() -> None:
    qkv = torch.randn(T, (H + 2 * KVH) * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], -1))
    flops = 4 * H * D * T * (T + 1) / 2
    run = lambda: triton_paged.dense_causal_attention(q, k, v, D**-0.5)
    choices = (("default", contextlib.nullcontext()), ("cudnn", sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
               ("flash", sdpa_kernel([SDPBackend.FLASH_ATTENTION])))
    for name, backend in choices:  # the default: whichever torch picks
        with warnings.catch_warnings(), backend:
            warnings.simplefilter("ignore")
            ms = triton.testing.do_bench(run, warmup=5, rep=30, return_mode="median")
        print(f"dense causal attention, {name:8s}: {ms * 1e3:7.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s")


def ttft_ab(iters: int = 10) -> None:
    llm = LLM(model_path("llama-3.1-8b"), load_format="dummy", skip_tokenizer_init=True, max_model_len=T + 1,
              max_num_seqs=8)
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(0, 10000, size=T).tolist()}
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([prompt], one, use_tqdm=False)
    threshold = triton_paged.DENSE_PREFILL_MIN_TOKENS
    times: dict[str, list[float]] = {"dense": [], "paged": []}
    for i in range(2 * iters):
        mode = "dense" if i % 2 else "paged"
        triton_paged.DENSE_PREFILL_MIN_TOKENS = threshold if mode == "dense" else T + 1
        llm.reset_prefix_cache()
        torch.cuda.synchronize()
        started = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        times[mode].append(1e3 * (time.perf_counter() - started))
    triton_paged.DENSE_PREFILL_MIN_TOKENS = threshold
    for mode, values in times.items():
        print(f"TTFT {T} tokens, {mode}: median {statistics.median(values):.1f} ms  {[round(x, 1) for x in values]}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    kernels()
    ttft_ab()
