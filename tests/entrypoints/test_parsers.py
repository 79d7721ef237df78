"""Reasoning and tool-call parsers on fixed texts, whole and streamed piece by piece."""

from __future__ import annotations

import json

import pytest

from tokenmill.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from tokenmill.entrypoints.openai.tool_parsers import get_tool_parser


def stream(parser, text: str, step: int) -> tuple[str, str]:
    reasoning, content, previous = "", "", ""
    for end in list(range(step, len(text), step)) + [len(text)]:
        r, c = parser.extract_delta(previous, text[:end])
        reasoning += r or ""
        content += c or ""
        previous = text[:end]
    return reasoning, content


@pytest.mark.parametrize("name, text, reasoning, content", [
    ("qwen3", "<think>Let me add 2 and 2.</think>\n\nIt is 4.", "Let me add 2 and 2.", "It is 4."),
    ("qwen3", "No thinking here.", None, "No thinking here."),
    ("qwen3", "<think>still thinking", "still thinking", None),
    ("deepseek_r1", "Hmm, 2+2.</think>The answer is 4.", "Hmm, 2+2.", "The answer is 4."),
    ("deepseek_r1", "<think>Explicit.</think>Done", "Explicit.", "Done"),
])
@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_reasoning_split_whole_and_streamed(name, text, reasoning, content, step):
    parser = get_reasoning_parser(name)
    assert parser.extract(text) == (reasoning, content)
    streamed = stream(parser, text, step)
    assert streamed == (reasoning or "", content or "")
    for piece in streamed:
        assert "<think" not in piece and "</think" not in piece


def test_hermes_calls_content_and_bad_json():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = get_tool_parser("hermes").extract(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    broken = "<tool_call>{not json}</tool_call> ok"
    assert get_tool_parser("hermes").extract(broken) == (broken, [])
    assert get_tool_parser("hermes").extract("plain answer") == ("plain answer", [])
    parser = get_tool_parser("hermes")
    assert parser.may_be_tool_call("Sure <tool_") and not parser.may_be_tool_call("Sure, here it is")


def test_llama3_json_calls():
    parser = get_tool_parser("llama3_json")
    content, calls = parser.extract('<|python_tag|>{"name": "search", "parameters": {"q": "tokenmill"}}; '
                                    '{"name": "open", "parameters": {"id": 3}}')
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("search", {"q": "tokenmill"}), ("open", {"id": 3})]
    assert parser.extract("The answer is 42.") == ("The answer is 42.", [])
    assert parser.extract('{"not": "a call"}') == ('{"not": "a call"}', [])
    assert parser.may_be_tool_call('{"na') and not parser.may_be_tool_call("Hello")


def test_unknown_parsers_are_named():
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'"):
        get_reasoning_parser("nope")


def test_thinking_open_decides_where_a_grammar_starts():
    assert get_reasoning_parser("deepseek_r1").thinking_open("<|user|>hi<|assistant|>")
    qwen3 = get_reasoning_parser("qwen3")
    assert qwen3.thinking_open("<|im_start|>assistant\n<think>\n")
    assert not qwen3.thinking_open("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not qwen3.thinking_open("<|im_start|>assistant\n")
