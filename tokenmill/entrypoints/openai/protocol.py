"""OpenAI request and response bodies (pydantic), with vLLM's extra sampling fields.

Requests turn themselves into SamplingParams; value checks that SamplingParams does not make (and
that need no model knowledge) live here as validators, so pydantic reports them as 400s.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tokenmill.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]; vLLM clamps to it
SEED_RANGE = (-(2**63), 2**63 - 1)  # what a torch.Generator accepts
# Free-form JSON fields the server walks (templates, grammars): a deep value there costs recursion or minutes
# of grammar compilation, so their depth is capped. Typed fields are bounded by validation.
FREE_FORM_FIELDS = ("response_format", "structured_outputs", "chat_template_kwargs", "tools", "tool_choice")


def json_depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether lists/dicts nest deeper than max_depth (a flat list is depth 1); iterative, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_utf8(value: Any, field: str) -> Any:
    """JSON's \\ud800 escapes decode to lone surrogates, which the tokenizer cannot take (a 500 otherwise)."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{field} is not valid UTF-8: it contains a lone surrogate") from None
    return value


class OpenAIModel(BaseModel):
    # Unknown fields are accepted (clients send many optional ones), logged once per name and otherwise
    # ignored, as vLLM does; fields tokenmill knows but does not implement are `unsupported` (a 400 unless
    # left at a value that means "off"). Types are strict, as OpenAI's are: "n": "2" or "stream": "yes" is
    # a 400, not a silent coercion.
    model_config = ConfigDict(extra="allow", strict=True)

    # field -> the values a request may send for it (they mean "not used"); any other is refused
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def unsupported_field(self) -> tuple[str, Any] | None:
        """The first field, among those sent beyond the declared ones, set to a value tokenmill does not
        implement: (name, value)."""
        for name, value in (self.model_extra or {}).items():
            if name in self.unsupported and not any(value == allowed and type(value) is type(allowed)
                                                    for allowed in self.unsupported[name]):
                return name, value
        return None


# ---- errors ----------------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- shared ----------------------------------------------------------------------------------------

class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


# vLLM's sampling and serving extensions, and OpenAI's fields, that tokenmill does not implement yet.
_UNSUPPORTED_SAMPLING: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (None, False), "best_of": (None, 1), "length_penalty": (None, 1.0, 1),
    "early_stopping": (None, False), "priority": (None, 0), "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,), "bad_words": (None, []), "prompt_logprobs": (None,),
    "logits_processors": (None,), "return_tokens_as_token_ids": (None, False), "return_token_ids": (None, False),
    "cache_salt": (None,), "kv_transfer_params": (None,), "vllm_xargs": (None,), "prompt_embeds": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,), "structural_tag": (None,),
    "store": (None, False), "metadata": (None,), "service_tier": (None, "auto", "default"),
}
# Hints for some: what to use instead.
UNSUPPORTED_HINTS = {name: "use structured_outputs" for name in _UNSUPPORTED_SAMPLING if name.startswith("guided_")}


class SamplingRequest(OpenAIModel):
    """Fields common to completions and chat completions."""

    unsupported = _UNSUPPORTED_SAMPLING

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}
    response_format: dict[str, Any] | None = None
    # vLLM's extra body: {"json": ..., "regex": ..., "choice": [...], "grammar": ..., "json_object": true}
    structured_outputs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        return check_utf8(value, "stop")

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | None) -> int | None:
        if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise ValueError(f"seed must be a 64-bit signed integer, got {value}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options can only be set when stream is true")
        return value

    def _logit_bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        try:
            bias = {int(token): float(value) for token, value in self.logit_bias.items()}
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {list(self.logit_bias)[:5]}") from None
        if not all(math.isfinite(value) for value in bias.values()):
            raise ValueError("logit_bias values must be finite numbers")
        return {token: min(max(value, -MAX_LOGIT_BIAS), MAX_LOGIT_BIAS) for token, value in bias.items()}

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        if self.structured_outputs is not None:
            unknown = set(self.structured_outputs) - {"json", "regex", "choice", "grammar", "json_object"}
            if unknown:
                raise ValueError(f"structured_outputs has unknown keys {sorted(unknown)}")
            return StructuredOutputsParams(**self.structured_outputs)
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            schema = (self.response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
            return StructuredOutputsParams(json=schema)
        raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")

    def _sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                         defaults: dict[str, Any]) -> SamplingParams:
        # A field left out (None) takes the model's default (`defaults`, its generation config's), else
        # SamplingParams' own.
        optional = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                        repetition_penalty=self.repetition_penalty)
        chosen = {name: defaults[name] for name in optional if name in defaults}
        chosen.update({name: value for name, value in optional.items() if value is not None})
        return SamplingParams(
            **chosen,
            n=self.n, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self._logit_bias(), ignore_eos=self.ignore_eos, max_tokens=max_tokens,
            min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=self._structured_outputs(),
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---- completions -----------------------------------------------------------------------------------

class CompletionRequest(SamplingRequest):
    unsupported = {**_UNSUPPORTED_SAMPLING, "suffix": (None,), "add_special_tokens": (None, True)}

    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for completions
    logprobs: int | None = None
    echo: bool = False

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {value}")
        return value

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: list | str) -> list | str:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return check_utf8(value, "prompt")

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs, defaults)


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- chat completions ------------------------------------------------------------------------------

class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


def check_messages(value: list[ChatMessage]) -> list[ChatMessage]:
    if not value:
        raise ValueError("messages must contain at least one message")
    return value


class ChatMessage(OpenAIModel):
    # an enum in the OpenAPI schema too, so clients and schema-driven fuzzers see which roles are served
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        check_utf8([part.text for part in value] if isinstance(value, list) else value, "content")
        return value

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (vLLM's rule)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content parts are supported, got a part of type {part.type!r}")
            texts.append(part.text)
        return "\n".join(texts)


class ChatCompletionRequest(SamplingRequest):
    unsupported = {**_UNSUPPORTED_SAMPLING, "echo": (None, False), "add_special_tokens": (None, False),
                   "chat_template": (None,), "documents": (None,), "mm_processor_kwargs": (None,),
                   "reasoning_effort": (None,), "include_reasoning": (None, True), "functions": (None,),
                   "function_call": (None,), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
                   "web_search_options": (None,)}

    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        return check_messages(value)

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            if not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {value}")
            if value > 0 and not info.data.get("logprobs"):
                raise ValueError("when using `top_logprobs`, `logprobs` must be set to true")
        return value

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        for tool in self.tools or []:
            function = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(
                    function.get("name"), str):
                raise ValueError("each of tools must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or name not in self.tool_names:
                raise ValueError(f"tool_choice names function {name!r}, which is not among tools")
        elif choice not in (None, "none", "auto", "required"):
            raise ValueError(f"tool_choice must be none, auto, required or a named function, got {choice!r}")
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools or []]

    @property
    def tool_mode(self) -> str:
        """"none", "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, dict):
            return "named"
        return self.tool_choice or "auto"

    def _parameters(self, name: str) -> dict[str, Any]:
        function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return function.get("parameters") or {"type": "object"}

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """Forced tool calls are enforced by the grammar: the arguments of the named function, or an
        array of {name, parameters} calls for "required"."""
        if self.tool_mode == "named":
            return StructuredOutputsParams(json=self._parameters(self.tool_choice["function"]["name"]))
        if self.tool_mode == "required":
            call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name},
                                                                "parameters": self._parameters(name)},
                               "required": ["name", "parameters"]} for name in self.tool_names]}
            max_items = None if self.parallel_tool_calls is not False else 1
            schema = {"type": "array", "minItems": 1, "items": call}
            if max_items:
                schema["maxItems"] = max_items
            return StructuredOutputsParams(json=schema)
        return super()._structured_outputs()

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, None, defaults)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """OpenAI's shape: id, type and name come in a call's first delta only, and are absent, not null, after."""
        data = handler(self)
        data["function"] = {k: v for k, v in data["function"].items() if v is not None}
        return {k: v for k, v in data.items() if v is not None}


class ResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer -----------------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str) -> str:
        return check_utf8(value, "prompt")


class TokenizeChatRequest(OpenAIModel):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        return check_messages(value)


def _tokenize_kind(body: Any) -> str:
    chat = isinstance(body, dict) and "messages" in body
    return TokenizeChatRequest.__name__ if chat else TokenizeCompletionRequest.__name__


# /tokenize takes either body; choosing by "messages" first makes errors about one of them, not both. The tags
# are class names, which errors.py leaves out of error locations.
TokenizeRequest = Annotated[Annotated[TokenizeCompletionRequest, Tag(TokenizeCompletionRequest.__name__)]
                            | Annotated[TokenizeChatRequest, Tag(TokenizeChatRequest.__name__)],
                            Discriminator(_tokenize_kind)]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
