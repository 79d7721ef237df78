"""What every benchmark shares: workloads, the result record, the table."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(name: str, num_prompts: int | None, input_len: int, output_len: int, seed: int = 0,
                  vocab_limit: int = 10000) -> Workload:
    """nano: 256 requests, prompt and output lengths uniform in [100, 1024], token ids in [0, 10000).
    fixed: `num_prompts` requests of exactly input_len / output_len tokens."""
    rng = np.random.default_rng(seed)
    if name == "nano":
        n = num_prompts or 256
        input_lens = rng.integers(100, 1025, size=n)
        output_lens = rng.integers(100, 1025, size=n)
    elif name == "fixed":
        n = num_prompts or 64
        input_lens = np.full(n, input_len)
        output_lens = np.full(n, output_len)
    else:
        raise ValueError(f"unknown workload {name!r}: choose nano or fixed")
    prompts = [rng.integers(0, vocab_limit, size=int(length)).tolist() for length in input_lens]
    return Workload(name, prompts, [int(x) for x in output_lens])


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Announces a phase of a benchmark, then says how long it took: one line each, on stderr."""
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    print(f"bench: {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TOKENMILL_COMMIT", "unknown")


def base_record() -> dict:
    return {"device": device_name(), "commit": os.environ.get("TOKENMILL_COMMIT") or git_commit(),
            "command": "tokenmill " + shlex.join(sys.argv[1:])}


def spec_decode_record(llm) -> dict:
    """With speculative decoding: the run's acceptance rate (accepted / verified drafts) and mean accepted length
    (tokens a drafting request emits per step: accepted drafts + 1), from the engine's vLLM counters."""
    metrics = llm.get_metrics()
    drafts, draft_tokens = metrics["vllm:spec_decode_num_drafts"], metrics["vllm:spec_decode_num_draft_tokens"]
    if not drafts:
        return {}
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"]
    return {"spec_acceptance_rate": accepted / draft_tokens, "spec_mean_acceptance_length": 1 + accepted / drafts}


def spec_columns(record: dict) -> list[str]:
    return [c for c in ("spec_acceptance_rate", "spec_mean_acceptance_length") if c in record]


def write_records(records: list[dict] | dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(records, f, indent=1)


def print_table(records: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in records)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in records:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)
