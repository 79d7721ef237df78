"""POST /v1/completions: one engine request per prompt, choices indexed prompt_index * n + i."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import Response, StreamingResponse

from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from tokenmill.entrypoints.openai.serving_engine import (
    SSE_DONE,
    SSE_HEADERS,
    OpenAIServing,
    clamp,
    final_outputs,
    json_response,
    merge_streams,
    sse,
    sse_error,
)
from tokenmill.outputs import PositionLogprobs, RequestOutput

logger = logging.getLogger(__name__)

Prompt = tuple[str | None, list[int]]  # (text if given as text, token ids)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> Response:
        self.check_model(request.model)
        self.check_supported(request)
        self.check_limits(request)
        prompts = self._prompts(request.prompt)
        params = []
        for _, token_ids in prompts:
            max_tokens = self.resolve_max_tokens(len(token_ids), request.max_tokens)
            params.append(self.sampling_params(request.to_sampling_params, max_tokens))
        request_id = random_id("cmpl")
        streams = self.add_requests(request_id, prompts, params)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, prompts, streams),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        outputs = await final_outputs(streams)
        return json_response(self._response(request, request_id, prompts, outputs))

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        result = []
        for p in prompt:
            if isinstance(p, str):
                result.append((p, self.tokenizer.encode(p)))
            else:
                if not p:
                    raise OpenAIError("a token-id prompt must not be empty", param="prompt")
                result.append((None, list(p)))
        return result

    def _echo_text(self, prompt: Prompt) -> str:
        text, token_ids = prompt
        return text if text is not None else self.tokenizer.decode(token_ids)

    def _logprobs(self, token_ids: list[int], positions: list[PositionLogprobs | None],
                  offset: int) -> tuple[CompletionLogProbs, int]:
        """OpenAI's legacy shape; `offset` is where this piece's text starts in the choice's text."""
        result = CompletionLogProbs()
        for token_id, position in zip(token_ids, positions):
            chosen = position.get(token_id) if position is not None else None
            token = self.token_text(token_id, chosen)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if chosen is None:  # the first prompt token has nothing to be predicted from
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
            else:
                result.token_logprobs.append(clamp(chosen.logprob))
                result.top_logprobs.append({self.token_text(t, lp): clamp(lp.logprob) for t, lp in position.items()})
        return result, offset

    @staticmethod
    def _join(a: CompletionLogProbs, b: CompletionLogProbs) -> CompletionLogProbs:
        return CompletionLogProbs(text_offset=a.text_offset + b.text_offset, tokens=a.tokens + b.tokens,
                                  token_logprobs=a.token_logprobs + b.token_logprobs,
                                  top_logprobs=a.top_logprobs + b.top_logprobs)

    def _choice_logprobs(self, request: CompletionRequest, prompt: Prompt, output: RequestOutput, token_ids: list[int],
                         positions: list[PositionLogprobs] | None, echo: bool,
                         offset: int) -> tuple[CompletionLogProbs | None, int]:
        if request.logprobs is None:
            return None, offset
        logprobs = CompletionLogProbs()
        if echo:
            prompt_positions = output.prompt_logprobs or [None] * len(prompt[1])
            logprobs, offset = self._logprobs(prompt[1], prompt_positions, offset)
        generated, offset = self._logprobs(token_ids, positions or [], offset)
        return self._join(logprobs, generated), offset

    def _response(self, request: CompletionRequest, request_id: str, prompts: list[Prompt],
                  outputs: list[RequestOutput]) -> CompletionResponse:
        choices = []
        num_prompt = num_completion = num_cached = 0
        for i, (prompt, output) in enumerate(zip(prompts, outputs)):
            num_prompt += len(prompt[1])
            num_cached += output.num_cached_tokens
            for completion in output.outputs:
                num_completion += len(completion.token_ids)
                text = (self._echo_text(prompt) if request.echo else "") + completion.text
                logprobs, _ = self._choice_logprobs(request, prompt, output, completion.token_ids,
                                                    completion.logprobs, request.echo, 0)
                choices.append(CompletionChoice(index=i * request.n + completion.index, text=text, logprobs=logprobs,
                                                finish_reason=completion.finish_reason,
                                                stop_reason=completion.stop_reason))
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=self.usage(num_prompt, num_completion, num_cached))

    async def _stream(self, request: CompletionRequest, request_id: str, prompts: list[Prompt],
                      streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        num_choices = len(prompts) * request.n
        started = [False] * num_choices  # echo goes with a choice's first chunk
        offsets = [0] * num_choices
        num_completion = [0] * num_choices
        num_cached = [0] * len(prompts)
        num_prompt = sum(len(p[1]) for p in prompts)
        merged = merge_streams(streams)
        try:
            async for i, output in merged:
                num_cached[i] = output.num_cached_tokens
                for completion in output.outputs:
                    index = i * request.n + completion.index
                    num_completion[index] += len(completion.token_ids)
                    if not completion.token_ids and not completion.text and completion.finish_reason is None:
                        continue  # e.g. a prompt chunk: nothing to say yet
                    echo = request.echo and not started[index]
                    started[index] = True
                    text = (self._echo_text(prompts[i]) if echo else "") + completion.text
                    logprobs, offsets[index] = self._choice_logprobs(request, prompts[i], output,
                                                                     completion.token_ids, completion.logprobs, echo,
                                                                     offsets[index])
                    chunk = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[
                        CompletionChoice(index=index, text=text, logprobs=logprobs,
                                         finish_reason=completion.finish_reason,
                                         stop_reason=completion.stop_reason)])
                    if request.stream_options and request.stream_options.continuous_usage_stats:
                        chunk.usage = self.usage(num_prompt, sum(num_completion), sum(num_cached))
                    yield sse(chunk)
            if request.include_usage:
                yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                             usage=self.usage(num_prompt, sum(num_completion), sum(num_cached))))
        except EngineDeadError as e:
            yield sse_error(f"the engine is dead: {e}")
        except Exception as e:  # noqa: BLE001 - the status line is sent: say it in the stream
            logger.exception("completion stream failed")
            yield sse_error(f"internal error: {type(e).__name__}: {e}")
        finally:
            await merged.aclose()
            for stream in streams:
                await stream.aclose()
        yield SSE_DONE
