"""What completions and chat share: model names, the context-length rule, building SamplingParams,
merging several requests' streams, and SSE framing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.entrypoints.openai.errors import OpenAIError, error_body
from tokenmill.entrypoints.openai.limits import RequestLimits
from tokenmill.entrypoints.openai.protocol import (
    FREE_FORM_FIELDS,
    UNSUPPORTED_HINTS,
    OpenAIModel,
    PromptTokensDetails,
    SamplingRequest,
    UsageInfo,
    json_depth_exceeds,
)
from tokenmill.outputs import Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps the same way
_warned_fields: set[str] = set()  # unknown request fields already logged


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str],
                 limits: RequestLimits = RequestLimits()) -> None:
        self.engine = engine
        self.limits = limits
        self.served_model_names = served_model_names
        self.model_name = served_model_names[0]
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(f"The model `{model}` does not exist.", HTTPStatus.NOT_FOUND, "model")

    def check_supported(self, request: OpenAIModel) -> None:
        """A field tokenmill knows but does not implement, set to a value other than "off", is a 400 naming
        it (the client would otherwise believe it got, say, beam search); a field it does not know is
        logged, once per name, and ignored."""
        refused = request.unsupported_field()
        if refused is not None:
            name, value = refused
            hint = f"; {UNSUPPORTED_HINTS[name]}" if name in UNSUPPORTED_HINTS else ""
            raise OpenAIError(f"{name}={value!r} is not supported by tokenmill{hint}", param=name)
        for name in request.model_extra or {}:
            if name not in request.unsupported and name not in _warned_fields:
                _warned_fields.add(name)
                logger.warning("ignoring the request field %r, which tokenmill does not know (logged once per "
                               "field name)", name)

    def check_limits(self, request: BaseModel) -> None:
        """The RequestLimits a parsed request must keep. Only fields its type declares are read: unknown fields
        are kept as sent (extra="allow"), so /tokenize's body may carry an "n" that is a dict."""
        def field(name: str, default: Any = None) -> Any:
            return getattr(request, name) if name in type(request).model_fields else default

        n = field("n", 1)
        if n > self.limits.max_n:
            raise OpenAIError(f"n must be at most {self.limits.max_n}, got {n}", param="n")
        for name in ("stop", "stop_token_ids"):
            values = field(name)
            if isinstance(values, list) and len(values) > self.limits.max_stop_strings:
                raise OpenAIError(f"{name} must have at most {self.limits.max_stop_strings} entries, got "
                                  f"{len(values)}", param=name)
        stop = field("stop")
        longest = max(map(len, [stop] if isinstance(stop, str) else stop or []), default=0)
        if longest > self.limits.max_stop_string_length:
            raise OpenAIError(f"stop strings must be at most {self.limits.max_stop_string_length} characters long, "
                              f"got one of {longest}", param="stop")
        for name in FREE_FORM_FIELDS:
            if json_depth_exceeds(field(name), self.limits.max_json_depth):
                raise OpenAIError(f"{name} is nested too deeply: at most {self.limits.max_json_depth} levels of "
                                  "lists and objects", param=name)

    def resolve_max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        """The completion budget: the request's, or what the context leaves (vLLM's default); a generation
        config's max_new_tokens caps either, as in vLLM."""
        if num_prompt_tokens >= self.max_model_len:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                              f"request has {num_prompt_tokens} input tokens. Please reduce the length of the input "
                              "messages.", param="messages")
        cap = self.engine.sampling_defaults.get("max_tokens")
        if requested is None:
            return min(self.max_model_len - num_prompt_tokens, cap or self.max_model_len)
        if requested >= 1 and num_prompt_tokens + requested > self.max_model_len:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the messages, "
                              f"{requested} in the completion). Please reduce the length of the messages or "
                              "completion.", param="max_tokens")
        return min(requested, cap) if cap and requested >= 1 else requested

    def sampling_params(self, make: Callable[[int, dict[str, Any]], SamplingParams], max_tokens: int
                        ) -> SamplingParams:
        """SamplingParams with the model's defaults where the request is silent. Its ValueErrors name the
        field first: they become 400s with that param."""
        try:
            return make(max_tokens, self.engine.sampling_defaults)
        except ValueError as e:
            raise OpenAIError(str(e), param=param_of(str(e))) from None

    def add_requests(self, request_id: str, prompts: list[tuple[str | None, list[int]]],
                     params: list[SamplingParams]) -> list[AsyncIterator[RequestOutput]]:
        """Submits every prompt, or none: a rejected prompt aborts the ones before it."""
        streams: list[AsyncIterator[RequestOutput]] = []
        ids: list[str] = []
        try:
            for i, ((text, token_ids), sp) in enumerate(zip(prompts, params)):
                ids.append(f"{request_id}-{i}")
                streams.append(self.engine.add_request(ids[-1], {"prompt": text, "prompt_token_ids": token_ids}, sp))
        except ValueError as e:
            for rid in ids[:len(streams)]:
                self.engine.abort_request(rid)
            raise OpenAIError(str(e), param=param_of(str(e))) from None
        return streams

    def usage(self, num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> UsageInfo:
        return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                         total_tokens=num_prompt_tokens + num_completion_tokens,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens))

    def token_text(self, token_id: int, logprob: Logprob | None = None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])


_PARAMS = set(SamplingRequest.model_fields) | {"prompt", "messages", "max_tokens", "logprobs"}


def param_of(message: str) -> str | None:
    """The request field an engine-side message starts with ("top_p must be ..."), if any."""
    first = message.split(" ", 1)[0]
    return first if first in _PARAMS else None


def clamp(value: float) -> float:
    return max(value, MIN_LOGPROB)


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                try:
                    output = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, output
    finally:
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def final_outputs(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The last output of each stream (FINAL_ONLY requests send only that one)."""
    async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        result = None
        async for output in stream:
            result = output
        assert result is not None
        return result

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def json_response(body: BaseModel) -> Response:
    """pydantic's serializer: faster than json.dumps, and writes non-finite floats as null, not a 500."""
    return Response(body.model_dump_json(), media_type="application/json")


def sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else payload.model_dump_json()}\n\n"


def sse_error(message: str, status: int = HTTPStatus.INTERNAL_SERVER_ERROR) -> str:
    return sse(error_body(message, status))


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
