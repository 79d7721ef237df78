"""Structured outputs in the engine core: grammars compiled off the step loop, one matcher per request.

    add_request -> compile(spec) in a worker thread (cached by spec) -> Future[CompiledGrammar]
    schedule    -> a constrained request is admitted once its grammar is ready
    update      -> each sampled token advances its matcher; a terminated grammar ends the request
    bitmask     -> for the constrained requests that sample this step, their matchers fill the rows of
                   one batch bitmask (in parallel threads); with async scheduling this happens after the
                   previous step's update, while this step's forward pass runs on the device
    runner      -> logits[rows] masked in one op (xgrammar's kernel) before sampling
Unconstrained requests never touch any of this.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from tokenmill.sampling_params import StructuredOutputsParams


def _parse(kind: str, spec: str):
    """The xgrammar Grammar of a structured-outputs spec (params.key): json, json_object, regex, choice
    or grammar (EBNF)."""
    import xgrammar as xgr

    if kind == "json":
        return xgr.Grammar.from_json_schema(spec)
    if kind == "json_object":
        return xgr.Grammar.builtin_json_grammar()
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec)))
    return xgr.Grammar.from_ebnf(spec)


class StructuredRequest:
    """A request's grammar (compiling, then compiled) and its matcher."""

    def __init__(self, future: Future, after_token_ids: list[int] | None = None) -> None:
        self.future = future
        self.matcher: Any | None = None
        self.error: str | None = None  # the compile failed: the request ends instead of running
        self.after_token_ids = after_token_ids or []
        self.active = not self.after_token_ids  # constraining yet (false while the model is reasoning)

    def observe(self, output_token_ids: list[int]) -> None:
        """Activates the grammar once the output ends with `after_token_ids`; its next token is the first
        constrained one."""
        n = len(self.after_token_ids)
        if not self.active and output_token_ids[-n:] == self.after_token_ids:
            self.active = True

    @property
    def ready(self) -> bool:
        """The compile has finished, successfully (a matcher) or not (an error)."""
        if self.matcher is None and self.error is None and self.future.done():
            if self.future.exception() is not None:
                self.error = f"the grammar could not be compiled: {self.future.exception()}"
            else:
                import xgrammar as xgr

                self.matcher = xgr.GrammarMatcher(self.future.result())
        return self.matcher is not None or self.error is not None


class StructuredOutputManager:
    def __init__(self, load_tokenizer: Any, vocab_size: int) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
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

    @staticmethod
    def validate(params: StructuredOutputsParams) -> None:
        """Parses the spec into a grammar (milliseconds, no tokenizer) and raises ValueError naming the
        problem; for the frontend, before any compute. The costly compile runs later, off the step loop."""
        kind, spec = params.key
        try:
            _parse(kind, spec)
        except Exception as exc:  # xgrammar raises RuntimeError with its own messages
            message = str(exc).split(": ", 1)[-1] if "] " in str(exc) else str(exc)
            raise ValueError(f"invalid structured_outputs.{kind}: {message}") from exc

    def _compile(self, key: tuple[str, str]):
        return self._get_compiler().compile_grammar(_parse(*key))

    def request(self, params: StructuredOutputsParams) -> StructuredRequest:
        """Starts (or reuses) the compile of this spec without blocking the step loop."""
        key = params.key
        future = self._cache.get(key)
        if future is None:
            future = self._executor.submit(self._compile, key)
            self._cache[key] = future
        return StructuredRequest(future, params.after_token_ids)

    def fill_bitmask(self, matchers: list[Any], rows: list[int], num_rows: int) -> torch.Tensor:
        """The first num_rows rows of a reused host bitmask (pinned on a GPU machine, so its copy to the
        device does not block), row rows[i] filled with matchers[i]'s next-token mask, in parallel threads
        (xgrammar's batch matcher, which releases the GIL); other rows are stale and must not be applied.
        Reusing it is safe because each step's bitmask is filled after the previous step's sampling, its
        only reader, has finished."""
        import xgrammar as xgr

        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher()
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            self._bitmask = xgr.allocate_token_bitmask(max(num_rows, 64), self.vocab_size)
            if torch.cuda.is_available():
                self._bitmask = self._bitmask.pin_memory()
        self._batch_matcher.batch_fill_next_token_bitmask(matchers, self._bitmask, rows)
        return self._bitmask[:num_rows]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Masks logits[rows] in place by the same rows of bitmask ([>= max(rows) + 1, ceil(vocab / 32)] int32,
    on the host): disallowed tokens become -inf; the other rows of logits are left alone."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
