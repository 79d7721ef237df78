"""The embedded SmolLM2-135M-Instruct (Q4_1 GGUF) on this CPU: single-stream decode tokens/s and 32-stream
throughput for tokenmill quantized (the default), tokenmill float32, HF transformers float32 and llama.cpp
(llama-cpp-python on the same GGUF file), in one run.

    pip install llama-cpp-python   # the peer; compiled from source (minutes), so not in the test extras
    python benchmarks/cpu_quant_bench.py --output-json benchmarks/results/cpu-<date>/quant.json

Every engine decodes greedily past end-of-sequence to a fixed length (single stream: one prompt, 128 tokens;
throughput: 32 different prompts of 128 tokens each, at once where the engine batches: llama-cpp-python's
Python API completes one prompt at a time). Tokens/s count generated tokens over the wall time of the call,
prefill included (the prompts are a dozen tokens), after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.entrypoints.cli.bench.common import base_record, write_records  # noqa: E402
from tokenmill.source.default_model import default_model_path  # noqa: E402

SINGLE_TOKENS, STREAMS, STREAM_TOKENS = 128, 32, 128
PROMPT = "The capital of France is"
PROMPTS = [f"Write a short story about the number {i}." for i in range(STREAMS)]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def tokenmill(dtype: str | None) -> dict[str, float]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(max_model_len=1024, **({"dtype": dtype} if dtype else {}))
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    llm.generate([PROMPT], params(8), use_tqdm=False)
    single = timed(lambda: llm.generate([PROMPT], params(SINGLE_TOKENS), use_tqdm=False))
    batch = timed(lambda: llm.generate(PROMPTS, params(STREAM_TOKENS), use_tqdm=False))
    llm.llm_engine.shutdown()
    return {"single_stream_tok_s": SINGLE_TOKENS / single, "throughput_tok_s": STREAMS * STREAM_TOKENS / batch}


def hf_transformers() -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    def generate(prompts: list[str], n: int) -> None:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    generate([PROMPT], 8)
    single = timed(lambda: generate([PROMPT], SINGLE_TOKENS))
    batch = timed(lambda: generate(PROMPTS, STREAM_TOKENS))
    return {"single_stream_tok_s": SINGLE_TOKENS / single, "throughput_tok_s": STREAMS * STREAM_TOKENS / batch}


def llama_cpp() -> dict[str, float]:
    from llama_cpp import Llama

    llm = Llama(default_model_path(), n_ctx=1024, n_threads=os.cpu_count(), verbose=False, seed=0)

    def complete(prompt: str, n: int) -> None:
        out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, logit_bias={llm.token_eos(): -1e9})
        assert out["usage"]["completion_tokens"] == n, out["usage"]

    complete(PROMPT, 8)
    single = timed(lambda: complete(PROMPT, SINGLE_TOKENS))
    batch = timed(lambda: [complete(p, STREAM_TOKENS) for p in PROMPTS])
    return {"single_stream_tok_s": SINGLE_TOKENS / single, "throughput_tok_s": STREAMS * STREAM_TOKENS / batch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--skip", action="append", default=[], help="an engine to leave out (e.g. llama.cpp)")
    args = parser.parse_args()
    engines = {"tokenmill (quantized, default)": lambda: tokenmill(None),
               "tokenmill float32": lambda: tokenmill("float32"),
               "HF transformers float32": hf_transformers, "llama.cpp (llama-cpp-python)": llama_cpp}
    results = {name: run() for name, run in engines.items() if name.split(" ")[0] not in args.skip}
    record = {"workload": "cpu-quantized-decode", "model": "SmolLM2-135M-Instruct.Q4_1.gguf (embedded)",
              "single_stream_tokens": SINGLE_TOKENS, "streams": STREAMS, "stream_tokens": STREAM_TOKENS,
              "cpu_count": os.cpu_count(), "results": results,
              "targets": {"single_stream": ">= llama.cpp", "throughput": ">= 3x HF transformers"},
              **base_record(), "command": "python benchmarks/cpu_quant_bench.py " + " ".join(sys.argv[1:])}
    for name, numbers in results.items():
        print(f"{name:<32} single stream {numbers['single_stream_tok_s']:8.1f} tok/s   "
              f"{STREAMS} streams {numbers['throughput_tok_s']:8.1f} tok/s")
    write_records(record, args.output_json)


if __name__ == "__main__":
    main()
