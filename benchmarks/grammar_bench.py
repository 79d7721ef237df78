"""Host cost of the grammar work per step, on the bench's JSON schema and tokenizer: filling the batch
bitmask and accepting one token per matcher, serially and in parallel threads (and serially without the
rollback history); and how long a background
thread waits for the GIL while the main thread runs Python.

    python benchmarks/grammar_bench.py      # needs xgrammar and .bench-tokenizer; about 20 s
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.bench.throughput import JSON_ARRAY_SCHEMA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    vocab = 128256
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(ROOT / ".bench-tokenizer"), vocab_size=vocab)
    grammar = xgr.GrammarCompiler(info).compile_grammar(xgr.Grammar.from_json_schema(json.dumps(JSON_ARRAY_SCHEMA)))
    rng = np.random.default_rng(0)
    pool = ThreadPoolExecutor(8)
    print(f"{os.cpu_count()} CPUs; ms per step, median of 30 steps; tokens drawn uniformly from each mask")
    print(f"{'matchers':>8} {'fill':>7} {'fill 4t':>8} {'accept':>7} {'acc 2t':>7} {'acc 4t':>7} {'acc 8t':>7} "
          f"{'no hist':>7}")
    for batch in (64, 128, 256):
        bitmask = xgr.allocate_token_bitmask(batch, vocab)
        fillers = {"fill": xgr.BatchGrammarMatcher(), "fill 4t": xgr.BatchGrammarMatcher(max_threads=4)}
        matchers = [xgr.GrammarMatcher(grammar) for _ in range(batch)]
        no_history = [xgr.GrammarMatcher(grammar, max_rollback_tokens=0) for _ in range(batch)]  # same states
        times: dict[str, list[float]] = {}
        for step in range(90):
            for name, filler in fillers.items():
                started = time.perf_counter()
                filler.batch_fill_next_token_bitmask(matchers, bitmask, list(range(batch)))
                times.setdefault(name, []).append(time.perf_counter() - started)
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
            tokens = [int(rng.choice(np.nonzero(row)[0])) for row in bits]
            threads = (1, 2, 4, 8)[step % 4]
            bounds = [batch * k // threads for k in range(threads + 1)]
            started = time.perf_counter()
            if threads == 1:
                xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
            else:
                list(pool.map(lambda k: xgr.BatchGrammarMatcher.batch_accept_token(
                    matchers[bounds[k]:bounds[k + 1]], tokens[bounds[k]:bounds[k + 1]]), range(threads)))
            times.setdefault("accept" if threads == 1 else f"acc {threads}t", []).append(time.perf_counter() - started)
            started = time.perf_counter()
            xgr.BatchGrammarMatcher.batch_accept_token(no_history, tokens)
            times.setdefault("no hist", []).append(time.perf_counter() - started)
            ended = [i for i, m in enumerate(matchers) if m.is_terminated()]
            for i in ended:
                matchers[i] = xgr.GrammarMatcher(grammar)
                no_history[i] = xgr.GrammarMatcher(grammar, max_rollback_tokens=0)
        row = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"{batch:8d} {row['fill']:7.2f} {row['fill 4t']:8.2f} {row['accept']:7.2f} {row['acc 2t']:7.2f} "
              f"{row['acc 4t']:7.2f} {row['acc 8t']:7.2f} {row['no hist']:7.2f}")

    for handshake in (False, True):  # a job submitted, then the main thread runs Python for 5 ms
        waits = []
        for _ in range(20):
            started, ready = [], threading.Event()
            job = pool.submit(lambda: started.append(time.perf_counter()) or ready.set())
            submitted = time.perf_counter()
            if handshake:  # waiting on an event hands the GIL over at once
                ready.wait()
            while time.perf_counter() - submitted < 0.005:
                pass
            job.result()
            waits.append(started[0] - submitted)
        print(f"background job start while the main thread runs Python, {'after a handshake' if handshake else 'plain'}: "
              f"median {1e3 * statistics.median(waits):.3f} ms (switch interval {1e3 * sys.getswitchinterval():.1f} ms)")

if __name__ == "__main__":
    main()
