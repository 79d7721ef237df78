"""Tool-call parsers (`--tool-call-parser`) for tool_choice "auto": the model's text -> (content, calls).

    hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (Qwen, SmolLM2, Hermes)
    llama3_json   {"name": ..., "parameters": {...}} objects, optionally after <|python_tag|>, ";"-separated

A block whose JSON does not parse is left in the content: nothing the model wrote is dropped.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text of the arguments object


def _call_from(obj: object, args_key: str) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(args_key, obj.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolParser(ABC):
    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content outside tool calls, or None if empty; the calls in order)."""

    def may_be_tool_call(self, text: str) -> bool:
        """While streaming: could `text` still turn into a tool call (so content must be held back)?"""
        return False


class HermesToolParser(ToolParser):
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
    OPEN = "<tool_call>"

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        calls, kept, last = [], [], 0
        for match in self.BLOCK.finditer(text):
            try:
                call = _call_from(json.loads(match.group(1)), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                continue
            calls.append(call)
            kept.append(text[last:match.start()])
            last = match.end()
        kept.append(text[last:])
        content = "".join(kept).strip()
        return (content or None), calls

    def may_be_tool_call(self, text: str) -> bool:
        stripped = text.rstrip()
        return self.OPEN in text or any(stripped.endswith(self.OPEN[:k]) for k in range(1, len(self.OPEN)))


class Llama3JsonToolParser(ToolParser):
    TAG = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].strip()
        if not body.startswith("{"):
            return (text.strip() or None), []
        decoder, calls, position = json.JSONDecoder(), [], 0
        while position < len(body):
            try:
                obj, end = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                return (text.strip() or None), []
            call = _call_from(obj, "parameters")
            if call is None:
                return (text.strip() or None), []
            calls.append(call)
            position = end
            while position < len(body) and body[position] in " \n\t;":
                position += 1
        return None, calls

    def may_be_tool_call(self, text: str) -> bool:
        body = text.lstrip()
        return body.startswith("{") or body.startswith(self.TAG) or self.TAG.startswith(body)


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
