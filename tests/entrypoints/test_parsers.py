"""Reasoning and tool-call parsers on fixed texts, whole and streamed piece by piece."""

from __future__ import annotations

import json
import random

import pytest

from tokenmill.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from tokenmill.entrypoints.openai.tool_parsers import (
    NamedToolParser,
    RequiredToolParser,
    StreamingToolCallParser,
    get_tool_parser,
)


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


def test_llama3_json_calls():
    parser = get_tool_parser("llama3_json")
    content, calls = parser.extract('<|python_tag|>{"name": "search", "parameters": {"q": "tokenmill"}}; '
                                    '{"name": "open", "parameters": {"id": 3}}')
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("search", {"q": "tokenmill"}), ("open", {"id": 3})]
    assert parser.extract("The answer is 42.") == ("The answer is 42.", [])
    assert parser.extract('{"not": "a call"}') == ('{"not": "a call"}', [])


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


# ---- tool calls streamed -------------------------------------------------------------------------------
# Each case: the parser, the model's text, and by hand the content and the calls (name, arguments dict) that the
# finished text holds. The arguments string of a call is json.dumps(dict, ensure_ascii=False).

NESTED = {"code": 'if (a) { print("}") } // </tool', "opts": {"deep": [1, 2.5, {"x": None}], "ok": True},
          "s": "tab\tend \u00e9 \U0001F600 a/b \\"}
TOOL_CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("hermes", '<tool_call>{"name":"run","arguments":{"code":"if (a) { print(\\"}\\") } // </tool",'
               '"opts":{"deep":[1,2.50,{"x":null}],"ok":true},'
               '"s":"tab\\tend \u00e9 \\ud83d\\ude00 a\\/b \\\\"}}</tool_call>',
     None, [("run", NESTED)]),
    ("hermes", "Use <tool> or <tool_cal, and 1 < 2.", "Use <tool> or <tool_cal, and 1 < 2.", []),
    ("hermes", "<tool_call>{not json}</tool_call> ok", "<tool_call>{not json}</tool_call> ok", []),
    ("hermes", ' A <tool_call>{"name": "f", "arguments": {"x": -1.5e3}}</tool_call>\n\nB <tool_call>',
     "A \n\nB <tool_call>", [("f", {"x": -1500.0})]),
    ("hermes", '<tool_call>{"arguments": {"x": [1, 2]}, "name": "late"}</tool_call><tool_call>{"name": "bare"}'
               '</tool_call>', None, [("late", {"x": [1, 2]}), ("bare", {})]),
    ("hermes", 'Sure.<tool_call>\n{"name": "f", "arguments": {"q": "a b"}}\n', "Sure.", [("f", {"q": "a b"})]),
    ("llama3_json", '<|python_tag|>{"name": "search", "parameters": {"q": "tokenmill"}}; '
                    '{"name": "open", "parameters": {"id": 3}}',
     None, [("search", {"q": "tokenmill"}), ("open", {"id": 3})]),
    ("llama3_json", ' {"name":"calc","parameters":{"expr":"{1+2}*3","nested":{"a":"\\"q\\"","b":[]}}} ',
     None, [("calc", {"expr": "{1+2}*3", "nested": {"a": '"q"', "b": []}})]),
    ("llama3_json", "The answer is 42.", "The answer is 42.", []),
    ("llama3_json", '{"not": "a call"}', '{"not": "a call"}', []),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}} and more', '{"name": "f", "parameters": {"a": 1}} and more',
     [("f", None)]),  # the call may be sent before the text shows it is none
    ("llama3_json", "<|python|> hi", "<|python|> hi", []),
    ("required", '[{"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "get_weather", "parameters": '
                 '{"city": "Paris", "unit": "celsius"}}]',
     None, [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("required", '[{"name": "get_time", "parameters": {"zone": "U', '[{"name": "get_time", "parameters": {"zone": "U',
     [("get_time", None)]),  # cut short by max_tokens: the call was sent, the finished text is content
    ("named", '{"city": "Paris", "unit":"celsius"}', None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("named", "", None, [("get_weather", {})]),
]


def tool_parser(name: str):
    return {"required": RequiredToolParser(), "named": NamedToolParser("get_weather")}.get(name) or \
        get_tool_parser(name)


def stream_tools(parser, pieces: list[str]) -> tuple[str, list[dict], int]:
    """Feed the growing text piece by piece: (content, calls as a client rebuilds them from the deltas, number of
    tool-call deltas that finish() sent), checking OpenAI's delta shape on the way."""
    streamer, text, content, calls, num_final = StreamingToolCallParser(parser), "", "", [], 0
    for piece in pieces + [None]:
        if piece is None:
            piece_content, deltas = streamer.finish(text)
            num_final = len(deltas)
        else:
            text += piece
            piece_content, deltas = streamer.update(text)
        content += piece_content
        for delta in deltas:
            wire = delta.model_dump(mode="json")
            assert wire["index"] <= len(calls)
            if wire["index"] == len(calls):  # a new call: id, type and name once, in its first delta
                assert wire["id"].startswith("call") and wire["type"] == "function"
                assert wire["function"] == {"name": wire["function"]["name"], "arguments": ""}
                calls.append({"id": wire["id"], "name": wire["function"]["name"], "arguments": ""})
            else:
                assert wire.keys() == {"index", "function"} and wire["function"].keys() == {"arguments"}
                assert wire["function"]["arguments"]
                calls[wire["index"]]["arguments"] += wire["function"]["arguments"]
    assert streamer.has_calls == bool(calls)
    return content, calls, num_final


def chunkings(text: str) -> list[list[str]]:
    """Whole, char by char, every split in two, and a few random splits in many."""
    rng = random.Random(text)
    cuts = [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 8))) for _ in range(10 if text else 0)]
    return [[text], list(text)] + [[text[:cut], text[cut:]] for cut in range(1, len(text))] + [
        [text[a:b] for a, b in zip([0, *c], [*c, len(text)])] for c in cuts]


@pytest.mark.parametrize("name, text, content, expected", TOOL_CASES)
def test_tool_calls_streamed_in_any_chunking_match_the_finished_text(name, text, content, expected):
    parser = tool_parser(name)
    whole_content, whole_calls = parser.extract(text)
    assert whole_content == content
    names = [n for n, _ in expected]
    valid = all(arguments is not None for _, arguments in expected)  # else the finished text holds no calls
    if not valid:
        assert whole_calls == []
    elif name == "named":  # the model's text as it is
        assert [(c.name, c.arguments) for c in whole_calls] == [("get_weather", text or "{}")]
    else:
        assert [(c.name, c.arguments) for c in whole_calls] == [
            (n, json.dumps(a, ensure_ascii=False)) for n, a in expected]
    for pieces in chunkings(text):
        streamed_content, calls, num_final = stream_tools(parser, pieces)
        assert streamed_content == (content or "")
        # a call that turns out not to be one was sent only if it was seen unfinished
        assert [c["name"] for c in calls] == (names if valid else names[:len(calls)])
        assert len({c["id"] for c in calls}) == len(calls)
        if valid:
            assert [c["arguments"] for c in calls] == [c.arguments for c in whole_calls]
            assert [json.loads(c["arguments"]) for c in calls] == [a for _, a in expected]
        if len(pieces) == len(text) > 1 and valid:  # char by char: all of each call is sent before the end
            assert num_final == 0


def test_streamed_content_holds_back_only_what_may_become_a_call():
    streamer = StreamingToolCallParser(get_tool_parser("hermes"))
    assert streamer.update("  Let me check. <tool_c") == ("Let me check.", [])
    assert streamer.update("  Let me check. <tool_cat>") == (" <tool_cat>", [])
    content, deltas = streamer.update('  Let me check. <tool_cat><tool_call>{"name": "f", "arguments": {"city": "Pa')
    assert content == "" and [d.function.arguments for d in deltas] == ["", '{"city": "Pa']
    assert deltas[0].function.name == "f"
    content, deltas = streamer.update('  Let me check. <tool_cat><tool_call>{"name": "f", "arguments": {"city": '
                                      '"Paris"}}</tool_call> Done')
    assert content == " Done" and [d.function.arguments for d in deltas] == ['ris"}']
