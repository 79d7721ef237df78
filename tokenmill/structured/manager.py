"""Structured outputs in the engine core: grammars compiled off the step loop, one matcher per request.

    add_request -> compile(spec) in a worker thread (cached by spec) -> Future[CompiledGrammar]
    schedule    -> a constrained request is admitted once its grammar is ready
    accept      -> a step's sampled tokens advance their matchers, chunks in parallel threads (xgrammar
                   releases the GIL); then the update ends the requests whose grammar terminated
    bitmask     -> right after the accept, a background thread fills the next step's rows of one batch
                   bitmask (xgrammar's batch matcher, threads of its own) while the step loop updates the
                   requests and the frontend processes their outputs; with async scheduling the next
                   step's forward pass is already running on the device meanwhile
    runner      -> the bitmask masks the logits inside the sampling kernel (or in one op, xgrammar's, before
                   other sampling paths)
Unconstrained requests never touch any of this.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tokenmill.metrics import step_timer
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.structured.grammar import StructuredRequest, parse_grammar

# Accepting a token costs tens of microseconds in a JSON grammar (a string token walks the parser character
# by character), so a batch of constrained requests is split across threads: each thread takes at least
# this many matchers, and at most this many threads run. Mask fills use as many threads of xgrammar's
# own. More threads than this were slower on the H100 machine's 16 cores:
# they contend with the step loop's thread and each other.
MIN_MATCHERS_PER_THREAD = 16
MAX_GRAMMAR_THREADS = 4


class StructuredOutputManager:
    def __init__(self, load_tokenizer: Any, vocab_size: int) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")  # compiles
        self._fill_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-fill")
        self._num_threads = max(1, min(MAX_GRAMMAR_THREADS, (os.cpu_count() or 1) // 2))
        self._accept_pool = ThreadPoolExecutor(max_workers=self._num_threads, thread_name_prefix="grammar-accept")
        self._cache: dict[tuple[str, str], Future] = {}
        self._batch_matcher = None
        self._bitmask: torch.Tensor | None = None

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._load_tokenizer(), vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def _compile(self, key: tuple[str, str]):
        return self._get_compiler().compile_grammar(parse_grammar(*key))

    def request(self, params: StructuredOutputsParams) -> StructuredRequest:
        """Starts (or reuses) the compile of this spec without blocking the step loop."""
        key = params.key
        future = self._cache.get(key)
        if future is None:
            future = self._executor.submit(self._compile, key)
            self._cache[key] = future
        return StructuredRequest(future, params.after_token_ids)

    def accept(self, requests: list[StructuredRequest], tokens: list[int]) -> None:
        """Advances requests[i]'s matcher by tokens[i] (a request may repeat, its tokens in order), then sets
        each request's `terminated`. xgrammar runs without the GIL, so chunks of the batch advance in
        parallel threads."""
        import xgrammar as xgr

        matchers = [r.matcher for r in requests]
        num_chunks = min(self._num_threads, len(matchers) // MIN_MATCHERS_PER_THREAD)
        if num_chunks <= 1:
            xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
        else:
            bounds = [len(matchers) * k // num_chunks for k in range(num_chunks + 1)]
            for k in range(1, num_chunks):  # a matcher's tokens stay in one chunk, in order
                while 0 < bounds[k] < len(matchers) and matchers[bounds[k]] is matchers[bounds[k] - 1]:
                    bounds[k] += 1
            list(self._accept_pool.map(lambda k: xgr.BatchGrammarMatcher.batch_accept_token(
                matchers[bounds[k]:bounds[k + 1]], tokens[bounds[k]:bounds[k + 1]]), range(num_chunks)))
        for request in requests:
            request.terminated = request.matcher.is_terminated()

    def fill(self, requests: list[StructuredRequest], rows: list[int], num_rows: int) -> torch.Tensor:
        """The first num_rows rows of a reused host bitmask, row rows[i] holding requests[i]'s next-token
        mask (xgrammar's batch matcher, threads of its own), the other rows all ones (no constraint).
        Pinned on a GPU machine, so its copy to the device does not block. Reusing the buffer is safe
        because each step's fill starts after the previous step's sampling, its only reader, has finished."""
        bitmask, fill = self._prepare_fill(requests, rows, num_rows)
        fill()
        return bitmask

    def start_fill(self, requests: list[StructuredRequest], rows: list[int], num_rows: int) -> Future:
        """fill() in a background thread, while the step loop goes on; the future gives the bitmask. The
        matchers must not advance until it is done."""
        bitmask, fill = self._prepare_fill(requests, rows, num_rows)

        def job() -> torch.Tensor:
            started.set()
            fill()
            return bitmask

        started = threading.Event()
        future = self._fill_thread.submit(job)
        # The job holds the GIL only to enter xgrammar, which releases it; everything else was prepared
        # here. Waiting for it to start hands it the GIL at once (else it waits for the switch interval,
        # 5 ms, while this thread runs Python).
        started.wait()
        return future

    def _prepare_fill(self, requests: list[StructuredRequest], rows: list[int], num_rows: int):
        """(bitmask, fill): the rows to fill, unconstrained rows already all ones, and the xgrammar call
        that fills the others."""
        import xgrammar as xgr

        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=self._num_threads)
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            self._bitmask = xgr.allocate_token_bitmask(max(num_rows, 64), self.vocab_size)
            if torch.cuda.is_available():
                self._bitmask = self._bitmask.pin_memory()
        bitmask = self._bitmask[:num_rows]
        unconstrained = np.ones(num_rows, dtype=bool)
        unconstrained[rows] = False
        bitmask.numpy()[unconstrained] = -1  # every token allowed (numpy: torch would wake its CPU thread pool)
        matchers, full = [r.matcher for r in requests], self._bitmask

        def fill() -> None:
            with step_timer.phase("fill_job"):
                self._batch_matcher.batch_fill_next_token_bitmask(matchers, full, rows)

        return bitmask, fill
