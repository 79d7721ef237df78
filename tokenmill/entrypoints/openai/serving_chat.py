"""POST /v1/chat/completions: render the messages with the chat template, then generate.

The rendered prompt is tokenized with add_special_tokens=False: the template already wrote every
special token it wants, and a tokenizer that adds a BOS would otherwise add a second one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from http import HTTPStatus

import jinja2
from fastapi.responses import Response, StreamingResponse

from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.limits import RequestLimits
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeltaMessage,
    FunctionCall,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    random_id,
)
from tokenmill.entrypoints.openai.reasoning_parsers import END as END_THINK
from tokenmill.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from tokenmill.entrypoints.openai.serving_engine import (
    MIN_LOGPROB,
    SSE_DONE,
    SSE_HEADERS,
    OpenAIServing,
    clamp,
    final_outputs,
    json_response,
    sse,
    sse_error,
)
from tokenmill.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    NamedToolParser,
    ParsedToolCall,
    RequiredToolParser,
    StreamingToolCallParser,
    ToolParser,
    detect_tool_call_parser,
    get_tool_parser,
    template_renders_tools,
)
from tokenmill.outputs import PositionLogprobs, RequestOutput

logger = logging.getLogger(__name__)

_RESERVED_TEMPLATE_KWARGS = {"conversation", "chat_template", "tokenize", "add_generation_prompt",
                             "continue_final_message", "return_dict"}


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path, or the template itself (vLLM accepts both)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a template")


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLM, served_model_names: list[str], chat_template: str | None = None,
                 tool_call_parser: str | None = None, enable_auto_tool_choice: bool | None = None,
                 reasoning_parser: str | None = None, limits: RequestLimits = RequestLimits()) -> None:
        """enable_auto_tool_choice None: on when the chat template renders tools in a format a parser reads
        (tool_call_parser then defaults to that parser); True or False as the flags say."""
        super().__init__(engine, served_model_names, limits)
        self.chat_template = chat_template or getattr(self.tokenizer, "chat_template", None)
        self.template_renders_tools = template_renders_tools(self.chat_template)
        if enable_auto_tool_choice is None:
            detected = detect_tool_call_parser(self.chat_template)
            tool_call_parser = tool_call_parser or detected
            enable_auto_tool_choice = tool_call_parser is not None and self.template_renders_tools
            if enable_auto_tool_choice:
                logger.info("tool_choice auto is on: the chat template renders tools; their calls are read with the "
                            "%s parser (--no-enable-auto-tool-choice turns this off)", tool_call_parser)
        self.tool_parser = get_tool_parser(tool_call_parser) if tool_call_parser else None
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.reasoning_parser = get_reasoning_parser(reasoning_parser) if reasoning_parser else None

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               continue_final_message: bool = False, template_kwargs: dict | None = None,
               tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """The prompt text and its token ids; `tools` are handed to the template so the model sees them."""
        if not self.chat_template:
            raise OpenAIError("this model has no chat template; start the server with --chat-template FILE")
        try:
            conversation = [{"role": m.role, "content": m.text(), **{
                k: v for k, v in (m.model_extra or {}).items() if k in ("tool_calls", "tool_call_id", "name")}}
                for m in messages]
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
        extra = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        if tools:
            extra["tools"] = tools
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message, **extra)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
            raise OpenAIError(f"the chat template could not render these messages: {e}", param="messages") from None
        try:  # lone surrogates can still come in through tools or chat_template_kwargs
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise OpenAIError("the rendered messages are not valid UTF-8: they contain a lone surrogate",
                              param="messages") from None
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    async def create_chat_completion(self, request: ChatCompletionRequest) -> Response:
        self.check_model(request.model)
        self.check_supported(request)
        self.check_limits(request)
        if request.tool_mode == "auto" and not (self.enable_auto_tool_choice and self.tool_parser):
            raise OpenAIError(self._no_auto_tools_reason(), param="tool_choice")
        text, token_ids = self.render(request.messages, request.add_generation_prompt,
                                      request.continue_final_message, request.chat_template_kwargs,
                                      request.tools if request.tool_mode != "none" else None)
        max_tokens = self.resolve_max_tokens(len(token_ids), request.requested_max_tokens)
        params = self.sampling_params(request.to_sampling_params, max_tokens)
        if params.structured_outputs is not None and self.reasoning_parser is not None and \
                self.reasoning_parser.thinking_open(text):
            # the grammar shapes the answer, not the thinking before it
            params.structured_outputs.after_token_ids = self.tokenizer.encode(END_THINK, add_special_tokens=False)
        request_id = random_id("chatcmpl")
        stream = self.add_requests(request_id, [(text, token_ids)], [params])[0]
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, len(token_ids), stream),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        output = (await final_outputs([stream]))[0]
        return json_response(self._response(request, request_id, output))

    def _logprobs(self, token_ids: list[int], positions: list[PositionLogprobs] | None,
                  num_top: int) -> ChatCompletionLogProbs:
        content = []
        for token_id, position in zip(token_ids, positions or []):
            chosen = position.get(token_id)
            token = self.token_text(token_id, chosen)
            ranked = sorted(position.items(), key=lambda item: -item[1].logprob)[:num_top]
            tops = []
            for top_id, top in ranked:
                top_token = self.token_text(top_id, top)
                tops.append(TopLogprob(token=top_token, logprob=clamp(top.logprob),
                                       bytes=list(top_token.encode("utf-8", errors="replace"))))
            content.append(TokenLogprob(token=token, logprob=clamp(chosen.logprob) if chosen else MIN_LOGPROB,
                                        bytes=list(token.encode("utf-8", errors="replace")), top_logprobs=tops))
        return ChatCompletionLogProbs(content=content)

    def _response(self, request: ChatCompletionRequest, request_id: str,
                  output: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for completion in output.outputs:
            logprobs = (self._logprobs(completion.token_ids, completion.logprobs, request.top_logprobs or 0)
                        if request.logprobs else None)
            reasoning, content, calls = self._split(request, completion.text)
            finish_reason = completion.finish_reason
            if calls and request.tool_mode == "auto":
                finish_reason = "tool_calls"
            message = ResponseMessage(content=content, reasoning_content=reasoning, tool_calls=[
                ToolCall(function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls])
            choices.append(ChatCompletionChoice(index=completion.index, message=message, logprobs=logprobs,
                                                finish_reason=finish_reason, stop_reason=completion.stop_reason))
        choices.sort(key=lambda c: c.index)
        num_completion = sum(len(c.token_ids) for c in output.outputs)
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=self.usage(len(output.prompt_token_ids), num_completion,
                                                       output.num_cached_tokens))

    def _no_auto_tools_reason(self) -> str:
        if not self.template_renders_tools:
            return ("this model's chat template has no tool format (it never shows the model its tools), so "
                    'tool_choice "auto" cannot work: send tool_choice "none", "required" or a named function, or '
                    "serve a model (or a --chat-template) that renders tools")
        if self.enable_auto_tool_choice is False:
            return '"auto" tool choice is turned off on this server (--no-enable-auto-tool-choice)'
        return ('"auto" tool choice needs a --tool-call-parser for this chat template\'s tool-call format '
                f"(known: {', '.join(sorted(TOOL_PARSERS))})")

    def _tool_parser(self, request: ChatCompletionRequest) -> ToolParser | None:
        """The parser that finds this request's tool calls in the answer, if it may have any."""
        if request.tool_mode == "named":
            return NamedToolParser(request.tool_choice["function"]["name"])
        if request.tool_mode == "required":
            return RequiredToolParser()
        return self.tool_parser if request.tool_mode == "auto" else None

    def _split(self, request: ChatCompletionRequest, text: str) -> tuple[str | None, str | None,
                                                                          list[ParsedToolCall]]:
        """(reasoning, content, tool calls) of a finished text."""
        reasoning, content = self.reasoning_parser.extract(text) if self.reasoning_parser else (None, text)
        parser = self._tool_parser(request)
        if parser is None:
            return reasoning, content, []
        content, calls = parser.extract(content or "")
        return reasoning, content, calls

    async def _stream(self, request: ChatCompletionRequest, request_id: str, num_prompt: int,
                      stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatCompletionChunkChoice], usage=None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=choices,
                                           usage=usage))

        num_completion = [0] * request.n
        num_cached = 0
        texts = [""] * request.n  # each choice's text so far
        sent_content = [0] * request.n  # characters of content already streamed (choices without tool calls)
        parser = self._tool_parser(request)
        tool_streams = [StreamingToolCallParser(parser) if parser else None for _ in range(request.n)]
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)
        try:
            for index in range(request.n):  # OpenAI opens each choice with the role
                yield chunk([ChatCompletionChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
            async for output in stream:
                num_cached = output.num_cached_tokens
                for completion in output.outputs:
                    num_completion[completion.index] += len(completion.token_ids)
                    if not completion.token_ids and not completion.text and completion.finish_reason is None:
                        continue
                    logprobs = (self._logprobs(completion.token_ids, completion.logprobs, request.top_logprobs or 0)
                                if request.logprobs else None)
                    tool_stream = tool_streams[completion.index]
                    delta = self._delta(completion.index, completion.text, completion.finish_reason is not None,
                                        texts, sent_content, tool_stream)
                    finish_reason = completion.finish_reason
                    if finish_reason and request.tool_mode == "auto" and tool_stream.has_calls:
                        finish_reason = "tool_calls"
                    choice = ChatCompletionChunkChoice(index=completion.index, delta=delta, logprobs=logprobs,
                                                       finish_reason=finish_reason,
                                                       stop_reason=completion.stop_reason)
                    usage = self.usage(num_prompt, sum(num_completion), num_cached) if continuous else None
                    yield chunk([choice], usage)
            if request.include_usage:
                yield chunk([], self.usage(num_prompt, sum(num_completion), num_cached))
        except EngineDeadError as e:
            yield sse_error(f"the engine is dead: {e}", HTTPStatus.INTERNAL_SERVER_ERROR)
        except Exception as e:  # noqa: BLE001 - the status line is sent: say it in the stream
            logger.exception("chat completion stream failed")
            yield sse_error(f"internal error: {type(e).__name__}: {e}")
        finally:
            await stream.aclose()
        yield SSE_DONE

    def _delta(self, index: int, new_text: str, finished: bool, texts: list[str], sent_content: list[int],
               tool_stream: StreamingToolCallParser | None) -> DeltaMessage:
        """This chunk's reasoning and content pieces, and its tool-call deltas (StreamingToolCallParser)."""
        previous, texts[index] = texts[index], texts[index] + new_text
        if self.reasoning_parser is None:
            reasoning_delta, content = None, texts[index]
        else:
            reasoning_delta, _ = self.reasoning_parser.extract_delta(previous, texts[index])
            content = self.reasoning_parser.extract(texts[index])[1] or ""
        if tool_stream is None:
            piece, sent_content[index] = content[sent_content[index]:], len(content)
            return DeltaMessage(content=piece or None, reasoning_content=reasoning_delta)
        piece, calls = tool_stream.finish(content) if finished else tool_stream.update(content)
        return DeltaMessage(content=piece or None, reasoning_content=reasoning_delta, tool_calls=calls or None)
