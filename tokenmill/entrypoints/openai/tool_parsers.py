"""Tool-call parsers: the model's text -> (content, calls), for finished texts and for streams.

    hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (Qwen, SmolLM2, Hermes); the
                  last block may lack </tool_call> (the model stopped right after the JSON)
    llama3_json   {"name": ..., "parameters": {...}} objects, optionally after <|python_tag|>, ";"-separated
    required      tool_choice "required": the [{"name": ..., "parameters": {...}}, ...] array the grammar forces
    named         a named tool_choice: the whole text is that function's arguments (the grammar forces them)

The first two are chosen with `--tool-call-parser` for tool_choice "auto". A block whose JSON does not parse is
left in the content: nothing the model wrote is dropped. A call's `arguments` is json.dumps of its arguments
object (ensure_ascii=False).

Each parser has one `scan(text, final)`. On a finished text it gives the content and the calls (`extract`); on a
text that may still grow it gives only what is certain: content that can no longer turn into a call, and each
call whose name is known and whose arguments object has begun, with the certain beginning of its `arguments`
(`_canonical_prefix`). StreamingToolCallParser sends the difference between one scan and the next.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from tokenmill.entrypoints.openai.protocol import DeltaToolCall, FunctionCall, random_id


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # json.dumps of the arguments object; while streaming, its certain beginning
    start: int = 0  # where the call's JSON starts in the text: the call's identity while the text grows


# ---- JSON, whole and partial -----------------------------------------------------------------------

_DECODER = json.JSONDecoder()
# one JSON token after optional whitespace: punctuation | a whole string | a number or word (true, null, NaN)
_TOKEN = re.compile(r'\s*(?:([{}\[\]:,])|("[^"\\]*+(?:\\.[^"\\]*+)*+")|([-+.\w]+))', re.DOTALL)
_STRING_UNITS = re.compile(r'"[^"\\]*+(?:(?:\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})[^"\\]*+)*+')  # whole characters
_DEPTH = {"{": 1, "[": 1, "}": -1, "]": -1}
_SPACED = {",": ", ", ":": ": "}  # json.dumps' separators


def _call_from(obj: object, args_key: str, start: int) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(args_key, obj.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False), start)


def _parse_call(text: str, args_key: str, start: int) -> ParsedToolCall | None:
    try:
        return _call_from(json.loads(text), args_key, start)
    except json.JSONDecodeError:
        return None


def _tokens(text: str, pos: int) -> Iterator[tuple[str, int]]:
    """The whole JSON tokens from text[pos:] and where each starts. A number or word at the very end of the
    text may still grow, and an unclosed string is not a token yet: both end the tokens."""
    while (match := _TOKEN.match(text, pos)) and not (match.lastindex == 3 and match.end() == len(text)):
        yield match.group(match.lastindex), match.start(match.lastindex)
        pos = match.end()


def _canonical_prefix(text: str, start: int) -> str:
    """The certain beginning of json.dumps(<the JSON value at text[start:]>, ensure_ascii=False) while that value
    is still being written. Whole tokens are rewritten one at a time as json.dumps writes them (its separators;
    numbers and strings through json.loads and json.dumps), so once the value is whole this is exactly
    json.dumps' text, unless an object repeats a key (json.loads keeps the last, the stream has sent the first;
    json.loads of either text still gives the same dict). An unclosed string adds what is certain of it."""
    out, depth, end = [], 0, start
    for token, at in _tokens(text, start):
        if token in _DEPTH or token in _SPACED:
            out.append(_SPACED.get(token, token))
            depth += _DEPTH.get(token, 0)
        else:
            try:
                out.append(json.dumps(json.loads(token), ensure_ascii=False))
            except json.JSONDecodeError:  # not JSON: the call will not parse, nothing more is certain
                return "".join(out)
        end = at + len(token)
        if depth == 0:
            return "".join(out)
    rest = text[end:].lstrip()
    if rest.startswith('"'):
        out.append(_string_prefix(rest))
    return "".join(out)


def _string_prefix(raw: str) -> str:
    """json.dumps of the certain part of the unclosed JSON string `raw`, without a closing quote: whole
    characters and escapes only, and no high surrogate whose low half may still follow."""
    try:
        value = json.loads(_STRING_UNITS.match(raw).group() + '"')
    except json.JSONDecodeError:  # a raw control character: not JSON
        return ""
    if value and "\ud800" <= value[-1] <= "\udbff":
        value = value[:-1]
    return json.dumps(value, ensure_ascii=False)[:-1]


def _partial_call(text: str, start: int, args_key: str) -> ParsedToolCall | None:
    """The call object at text[start:] while it is being written: its name and the certain beginning of its
    arguments, once the name's string is whole and the arguments object has begun (else None)."""
    name = arguments = None
    depth, key, previous = 0, None, None
    for token, at in _tokens(text, start):
        if previous is None and token != "{":
            return None
        if depth == 1 and token == ":":
            key = previous
        elif depth == 1 and previous == ":":  # the value of `key` begins
            if key == '"name"' and token.startswith('"'):
                name = _parse_string(token)
            elif key in (f'"{args_key}"', '"arguments"') and token == "{" and arguments is None:
                arguments = _canonical_prefix(text, at)
                if name is not None:  # all that is needed: the name came first, as it nearly always does
                    break
        depth += _DEPTH.get(token, 0)
        previous = token
        if depth == 0:
            break
    return ParsedToolCall(name, arguments, start) if name is not None and arguments is not None else None


def _parse_string(token: str) -> str | None:
    try:
        return json.loads(token)
    except json.JSONDecodeError:
        return None


def _call_sequence(text: str, pos: int, args_key: str, separators: str,
                   final: bool) -> tuple[list[ParsedToolCall], int] | None:
    """The call objects that follow one another from text[pos:], split by `separators`, and where they end;
    None if one of them is not a call. Unless final, an object still being written ends them as a partial call."""
    calls = []
    while text.startswith("{", pos):
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            if final:
                return None
            partial = _partial_call(text, pos, args_key)
            return calls + ([partial] if partial else []), len(text)
        call = _call_from(obj, args_key, pos)
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(text) and text[pos] in separators:
            pos += 1
    return calls, pos


def _skip_space(text: str, pos: int) -> int:
    return len(text) - len(text[pos:].lstrip())


def _without_tag_start(text: str, tag: str) -> str:
    """`text` less a trailing proper prefix of `tag` (e.g. "<tool_"): it may still become the tag."""
    for cut in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:cut]):
            return text[:-cut]
    return text


# ---- parsers ---------------------------------------------------------------------------------------

class ToolParser(ABC):
    @abstractmethod
    def scan(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """(content outside tool calls, not stripped; the calls in order) of `text`. Unless final, `text` may
        still grow and only what is certain is given (see the module's docstring)."""

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content outside tool calls, stripped, or None if empty; the calls in order) of a finished text."""
        content, calls = self.scan(text, final=True)
        return content.strip() or None, calls


class HermesToolParser(ToolParser):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def scan(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        content, calls, pos = [], [], 0
        while (open_at := text.find(self.OPEN, pos)) >= 0:
            content.append(text[pos:open_at])
            body_at = open_at + len(self.OPEN)
            close_at = text.find(self.CLOSE, body_at)  # the first </tool_call> closes the block, as a regex would
            if close_at < 0:  # still being written, or the model stopped before </tool_call>
                if not final:
                    call = _partial_call(_without_tag_start(text, self.CLOSE), body_at, "arguments")
                    return "".join(content), calls + ([call] if call else [])
                close_at = len(text)
            end = min(close_at + len(self.CLOSE), len(text))
            call = _parse_call(text[body_at:close_at].strip(), "arguments", body_at)
            if call is None:
                content.append(text[open_at:end])
            else:
                calls.append(call)
            pos = end
        content.append(text[pos:] if final else _without_tag_start(text[pos:], self.OPEN))
        return "".join(content), calls


class Llama3JsonToolParser(ToolParser):
    TAG = "<|python_tag|>"

    def scan(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """All or nothing: the calls if the whole text is calls, else the whole text is content."""
        pos = _skip_space(text, 0)
        if text.startswith(self.TAG, pos):
            pos = _skip_space(text, pos + len(self.TAG))
        elif not final and self.TAG.startswith(text[pos:]):
            return "", []
        if not final and pos == len(text):
            return "", []
        found = _call_sequence(text, pos, "parameters", " \n\t;", final)
        if found is None or text[found[1]:].strip() or (final and not found[0]):
            return text, []
        return "", found[0]


class RequiredToolParser(ToolParser):
    def scan(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """All or nothing, as for llama3_json (a text cut short by max_tokens stays content)."""
        pos = _skip_space(text, 0)
        if not final and pos == len(text):
            return "", []
        if not text.startswith("[", pos):
            return text, []
        found = _call_sequence(text, _skip_space(text, pos + 1), "parameters", " \n\t\r,", final)
        rest = text[found[1]:].strip() if found else None
        if rest == "]" or (rest == "" and not final):
            return "", found[0]
        return text, []


@dataclass
class NamedToolParser(ToolParser):
    name: str  # the function tool_choice names

    def scan(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        arguments = text or ("{}" if final else "")
        return "", [ParsedToolCall(self.name, arguments)] if arguments else []


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable, i.e. shows the model the tools it is offered."""
    if not chat_template:
        return False
    import jinja2
    import jinja2.meta

    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(parsed)


def detect_tool_call_parser(chat_template: str | None) -> str | None:
    """The parser whose format a chat template teaches the model for tool calls, if the template renders
    tools at all: <tool_call> blocks (hermes: Qwen2.5/3, Hermes, SmolLM3), or {"name", "parameters"} JSON
    with Llama 3.1's <|python_tag|> (llama3_json). None when the template shows no tools or no known format."""
    if not template_renders_tools(chat_template):
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or '"parameters": dictionary of argument name' in chat_template:
        return "llama3_json"
    return None


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


# ---- streaming -------------------------------------------------------------------------------------

@dataclass
class _SentCall:
    index: int
    arguments: str = ""


class StreamingToolCallParser:
    """One choice's content and tool calls, streamed in OpenAI's shape while its text grows:

        {"index": i, "id": "call-...", "type": "function", "function": {"name": NAME, "arguments": ""}}   once
        {"index": i, "function": {"arguments": FRAGMENT}}                                            then, repeated

    Each update scans the whole text so far (`ToolParser.scan`, the code `extract` runs on the finished text)
    and sends what is new: content stripped as `extract` strips it (whitespace at the end waits for what
    follows), a call once its name is known and its arguments object has begun, and the arguments as they
    become certain. The fragments of a call concatenate to the `arguments` that `extract` gives (but see
    `_canonical_prefix` on repeated keys). What was sent cannot be taken back: if a call turns out malformed
    (say cut short by max_tokens), it ends with the fragments sent, and its text comes as content.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.sent_content = ""
        self.sent_calls: dict[int, _SentCall] = {}  # call start -> what was sent; in the order sent

    @property
    def has_calls(self) -> bool:
        return bool(self.sent_calls)

    def update(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """(new content, new tool-call deltas), given the whole text so far."""
        return self._send(*self.parser.scan(text, final=False))

    def finish(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """The same for the finished text: the rest of everything."""
        return self._send(*self.parser.scan(text, final=True))

    def _send(self, content: str, calls: list[ParsedToolCall]) -> tuple[str, list[DeltaToolCall]]:
        content, piece = content.strip(), ""
        if content.startswith(self.sent_content):
            piece, self.sent_content = content[len(self.sent_content):], content
        deltas = []
        for call in calls:
            sent = self.sent_calls.get(call.start)
            if sent is None:
                sent = self.sent_calls[call.start] = _SentCall(len(self.sent_calls))
                deltas.append(DeltaToolCall(index=sent.index, id=random_id("call"), type="function",
                                            function=FunctionCall(name=call.name, arguments="")))
            if len(call.arguments) > len(sent.arguments) and call.arguments.startswith(sent.arguments):
                deltas.append(DeltaToolCall(index=sent.index,
                                            function=FunctionCall(arguments=call.arguments[len(sent.arguments):])))
                sent.arguments = call.arguments
        return piece, deltas
