"""Start-up as a newcomer meets it, on the CPU, the embedded model: wall time of `tokenmill generate` of 16
tokens (quantized, the default, and `--dtype float32`), of `make serve` until /health answers (and the memory
the server then holds), and, as the peer, of HF
transformers loading the same GGUF and generating 16 tokens.

    python benchmarks/startup_bench.py --runs 5 --output-json benchmarks/results/cpu-<date>/startup.json

Run from the repository root after `make install`. Each command runs in a fresh process, so every figure
includes the interpreter, the imports and the model load; the operating system's file cache is warm after the
first run, as it is for anyone who starts twice.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.entrypoints.cli.bench.common import base_record, write_records  # noqa: E402

VENV = ROOT / ".venv" / "bin"
PROMPT = "The capital of France is"
HF_PEER = """
import os, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from tokenmill.source.default_model import default_model_path
folder, name = os.path.split(default_model_path())
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
ids = tokenizer(sys.argv[1], return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0]))
"""


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def resident_mib(pid: int) -> float:
    """The process's and its children's resident memory."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for p in [pid, *map(int, children)]:
        with open(f"/proc/{p}/statm") as statm:
            total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


def serve_to_health(port: int) -> tuple[float, float]:
    """(seconds from `make serve` to a 200 from /health, MiB the server processes then hold)."""
    started = time.perf_counter()
    proc = subprocess.Popen(["make", "serve", f"PORT={port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("make serve exited before it answered") from None
                time.sleep(0.02)
        seconds = time.perf_counter() - started
        server = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
        return seconds, resident_mib(server)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hf-runs", type=int, default=2)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    command = [str(VENV / "tokenmill"), "generate", PROMPT, "--max-tokens", "16"]
    generate = [timed(command) for _ in range(args.runs)]
    generate_float32 = [timed([*command, "--dtype", "float32"]) for _ in range(args.runs)]
    served = [serve_to_health(args.port) for _ in range(args.runs)]
    hf = [timed([str(VENV / "python"), "-c", HF_PEER, PROMPT]) for _ in range(args.hf_runs)]
    record = {
        "workload": "cpu-startup", "model": "SmolLM2-135M-Instruct.Q4_1.gguf (embedded)",
        "tokenmill_generate_16_tokens_s": summary(generate),
        "tokenmill_generate_16_tokens_float32_s": summary(generate_float32),
        "make_serve_to_health_s": summary([seconds for seconds, _ in served]),
        "server_resident_mib": summary([mib for _, mib in served]),
        "hf_transformers_load_and_generate_16_tokens_s": summary(hf),
        "targets": {"tokenmill_generate_16_tokens_s": 3.0, "make_serve_to_health_s": 4.0},
        **base_record(), "command": "python benchmarks/startup_bench.py " + " ".join(sys.argv[1:]),
    }
    for key in ("tokenmill_generate_16_tokens_s", "tokenmill_generate_16_tokens_float32_s", "make_serve_to_health_s",
                "server_resident_mib",
                "hf_transformers_load_and_generate_16_tokens_s"):
        print(f"{key:<48} median {record[key]['median']:8.2f}  (min {record[key]['min']:.2f}, "
              f"max {record[key]['max']:.2f})")
    write_records(record, args.output_json)


if __name__ == "__main__":
    main()
