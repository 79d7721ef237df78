"""Frontend bookkeeping: engine-core outputs (token ids) -> RequestOutputs (text, logprobs, n > 1).

A request with n > 1 becomes n child requests in the core ("{i}_{request_id}"); the parent gathers
their completions. Stop strings are found here; the caller aborts those requests in the core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.interface import EngineCoreOutput, TokenLogprobs
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


def child_request_id(request_id: str, index: int) -> str:
    return f"{index}_{request_id}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sampling params of the index-th sample: n=1, and a distinct seed derived from the user's."""
    child = params.clone()
    child.n = 1
    if params.seed is not None:
        child.seed = params.seed + index
    return child


@dataclass
class ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: dict[int, RequestState] = field(default_factory=dict)
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n


class RequestState:
    def __init__(self, request_id: str, parent: ParentRequest, index: int, params: SamplingParams,
                 tokenizer: Any | None, arrival_time: float) -> None:
        self.request_id = request_id
        self.parent = parent
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self.detokenizer = (IncrementalDetokenizer(tokenizer, parent.prompt_token_ids, params)
                            if tokenizer is not None else None)
        self.token_ids: list[int] = []
        self._sent_tokens = 0
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self._sent_logprobs = 0
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    def _convert(self, entries: list[TokenLogprobs]) -> list[PositionLogprobs]:
        result = []
        for ids, values, rank in entries:
            texts = (self.tokenizer.batch_decode([[i] for i in ids]) if self.tokenizer is not None
                     else [None] * len(ids))
            position = {ids[0]: Logprob(values[0], rank, texts[0])}
            for j in range(1, len(ids)):
                position.setdefault(ids[j], Logprob(values[j], j, texts[j]))
            result.append(position)
        return result

    def update(self, out: EngineCoreOutput) -> str | None:
        """Applies one core output; returns a stop string if the text hit one."""
        now = time.monotonic()
        if out.new_token_ids:
            self.first_token_time = self.first_token_time or now
            self.last_token_time = now
        self.num_cached_tokens = out.num_cached_tokens
        stop, num_new = None, len(out.new_token_ids)
        if self.detokenizer is not None:
            num_read = len(self.detokenizer.ids)
            stop = self.detokenizer.update(out.new_token_ids)
            if stop is not None:  # a step of several tokens (speculation) ends at the one completing it
                num_new = len(self.detokenizer.ids) - num_read
        self.token_ids.extend(out.new_token_ids[:num_new])
        if out.new_prompt_logprobs and self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(self._convert(out.new_prompt_logprobs))
        if out.new_logprobs and self.logprobs is not None:
            new_logprobs = out.new_logprobs[:num_new]
            self.logprobs.extend(self._convert(new_logprobs))
            self.cumulative_logprob += sum(values[0] for _, values, _ in new_logprobs)
        if stop is not None:
            self.finish_reason, self.stop_reason = "stop", stop
        elif out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        return stop

    def completion(self, delta: bool) -> CompletionOutput:
        finished = self.finish_reason is not None
        text = self.detokenizer.get_next_output_text(finished, delta) if self.detokenizer is not None else ""
        if delta:
            token_ids, self._sent_tokens = self.token_ids[self._sent_tokens:], len(self.token_ids)
            logprobs = None
            if self.logprobs is not None:
                logprobs, self._sent_logprobs = self.logprobs[self._sent_logprobs:], len(self.logprobs)
        else:
            token_ids, logprobs = list(self.token_ids), self.logprobs
        return CompletionOutput(self.index, text, token_ids, self.cumulative_logprob, logprobs,
                                self.finish_reason, self.stop_reason)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}
        self.states: dict[str, RequestState] = {}  # core request id -> state

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        """Registers a request; returns the (core request id, params) pairs to send to the core."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        parent = ParentRequest(request_id, prompt, prompt_token_ids, params)
        self.parents[request_id] = parent
        arrival = time.monotonic()
        children = []
        for index in range(params.n):
            core_id = request_id if params.n == 1 else child_request_id(request_id, index)
            core_params = params if params.n == 1 else child_params(params, index)
            state = RequestState(core_id, parent, index, core_params, self.tokenizer, arrival)
            parent.children[index] = state
            self.states[core_id] = state
            children.append((core_id, core_params))
        return children

    def core_request_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return [c.request_id for c in parent.children.values()] if parent else []

    def abort(self, request_id: str) -> list[str]:
        """Forgets a request; returns its core ids so the caller can abort them in the core."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        for child in parent.children.values():
            self.states.pop(child.request_id, None)
        return [c.request_id for c in parent.children.values()]

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs to hand out and the core ids to abort (stop strings)."""
        results: list[RequestOutput] = []
        to_abort: list[str] = []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue
            if state.update(out) is not None and out.finish_reason is None:
                to_abort.append(out.request_id)
            if state.finish_reason is not None:
                del self.states[out.request_id]
                state.parent.num_finished += 1
            result = self._make_output(state)
            if result is not None:
                results.append(result)
            if state.parent.finished:
                self.parents.pop(state.parent.request_id, None)
        return results, to_abort

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        parent = state.parent
        kind = parent.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY:
            if not parent.finished:
                return None
            completions = [parent.children[i].completion(delta=False) for i in range(parent.params.n)]
        elif kind == RequestOutputKind.DELTA:
            completions = [state.completion(delta=True)]
        else:
            completions = [c.completion(delta=False) for _, c in sorted(parent.children.items())]
        prompt_logprobs = parent.children[0].prompt_logprobs
        metrics = {"arrival_time": state.arrival_time, "first_token_time": state.first_token_time or 0.0,
                   "last_token_time": state.last_token_time or 0.0}
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, prompt_logprobs,
                             completions, parent.finished, state.num_cached_tokens, metrics)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)
