"""What a newcomer meets first: sampling defaults from the model's generation config, tool choice taken from the
chat template, errors reported early and in one line, Ctrl-C in the chat, and little noise."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tokenmill import LLM
from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.entrypoints.openai.tool_parsers import detect_tool_call_parser, template_renders_tools
from tokenmill.source import resolve_model, sampling_defaults

MODEL = "SmolLM2-135M-Instruct"
CLI = [sys.executable, "-m", "tokenmill.entrypoints.cli"]
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": CITY}}]
# The tool parts of Qwen2.5's chat template (hermes format) and of Llama 3.1's (its JSON format).
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools>\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\n"
    "{%- endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA31_TOOLS_TEMPLATE = (
    "{%- if tools is not none %}Given the following functions, please respond with a JSON for a function call with "
    'its proper arguments that best answers the given prompt.\n\nRespond in the format {"name": function name, '
    '"parameters": dictionary of argument name and its value}.{% for t in tools %}{{ t | tojson }}{% endfor %}'
    "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}<|python_tag|>")


# ---- 1. sampling defaults from the model's generation config ------------------------------------------------

def test_generation_config_defaults(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    assert sampling_defaults(resolve_model(model_dir)) == {}  # the tiny model has no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.3, "top_k": 7, "top_p": 1.0, "max_new_tokens": 5, "do_sample": True}))
    source = resolve_model(model_dir)
    # a folder holding one; top_p 1.0 is transformers' own default, so it sets nothing
    assert sampling_defaults(source, str(tmp_path)) == {"temperature": 0.3, "top_k": 7, "max_tokens": 5}
    assert sampling_defaults(source, "vllm") == {}
    assert sampling_defaults(source, str(tmp_path), {"temperature": 0.0}) == {"temperature": 0.0, "top_k": 7,
                                                                           "max_tokens": 5}
    with pytest.raises(ValueError, match="generation_config must be"):
        sampling_defaults(source, str(tmp_path / "missing"))
    # the embedded model: its authors' settings
    assert sampling_defaults(resolve_model("default")) == {"temperature": 0.2, "top_p": 0.9}

    llm = LLM(model_dir, generation_config=str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20,
              max_model_len=128)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.3, 7, 5)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, use_tqdm=False)[0]  # no params: the defaults
    assert len(out.outputs[0].token_ids) <= 5


def test_request_values_win_over_the_defaults():
    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 7}
    silent = CompletionRequest(prompt="Hi").to_sampling_params(16, defaults)
    assert (silent.temperature, silent.top_p, silent.top_k) == (0.2, 0.9, 7)
    explicit = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], temperature=1.0,
                                     top_p=0.5).to_sampling_params(16, defaults)
    assert (explicit.temperature, explicit.top_p, explicit.top_k) == (1.0, 0.5, 7)
    assert CompletionRequest(prompt="Hi").to_sampling_params(16, {}).temperature == 1.0  # SamplingParams' own


# ---- 3. tool choice from the chat template --------------------------------------------------------------------

def test_tool_parser_detected_from_the_template(smol_tokenizer):
    assert detect_tool_call_parser(QWEN_TOOLS_TEMPLATE) == "hermes"
    assert detect_tool_call_parser(LLAMA31_TOOLS_TEMPLATE) == "llama3_json"
    # the embedded model's template never shows the model its tools
    assert not template_renders_tools(smol_tokenizer.chat_template)
    assert detect_tool_call_parser(smol_tokenizer.chat_template) is None
    assert detect_tool_call_parser("{{ tools }}{% for m in messages %}{{ m.content }}{% endfor %}") is None


def test_default_server_explains_why_auto_tools_cannot_work(plain_server):
    log = plain_server.log()
    assert "default sampling parameters from the model's generation config: {'temperature': 0.2, 'top_p': 0.9}" in log
    assert "tool_choice auto is on" not in log
    client = openai.OpenAI(base_url=f"{plain_server.url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="no tool format") as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=TOOLS, max_tokens=8)
    assert raised.value.body["param"] == "tool_choice"
    # forced calls do not need the template: the grammar enforces them
    forced = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris"}], tools=TOOLS,
                                            tool_choice="required", max_tokens=200, temperature=0)
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_a_template_that_renders_tools_turns_auto_tool_choice_on(start_server, tmp_path):
    template = tmp_path / "qwen-tools.jinja"
    template.write_text(QWEN_TOOLS_TEMPLATE)
    server = start_server(["--chat-template", str(template)], plain=True)
    assert "tool_choice auto is on" in server.log() and "hermes parser" in server.log()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=TOOLS, max_tokens=24, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- 5. errors found early, in one line ------------------------------------------------------------------------

def test_a_busy_port_is_refused_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        out = subprocess.run([*CLI, "serve", "--host", "127.0.0.1", "--port", str(port)], capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 1 and time.monotonic() - started < 20
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "model loaded" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", [["generate", "Hi"], ["serve", "--port", "0"]])
def test_a_kv_cache_too_small_is_one_line_and_a_failure(command):
    out = subprocess.run([*CLI, *command, "--kv-cache-memory-bytes", "100000"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stderr
    error_lines = [line for line in out.stderr.splitlines() if line.startswith(f"tokenmill {command[0]}: error:")]
    assert len(error_lines) == 1 and "fewer than one sequence of max_model_len" in error_lines[0]
    assert "Traceback" not in out.stderr


def test_a_form_body_gets_a_400_naming_the_content_type(plain_server):
    response = httpx.post(f"{plain_server.url}/v1/completions", data={"prompt": "Hi", "max_tokens": "4"})
    assert response.status_code == 400
    assert "Content-Type: application/json" in response.json()["error"]["message"]


def _read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> str:
    """stdout as it comes, until `marker` shows up (or the time is up)."""
    seen, deadline = "", time.monotonic() + timeout_s
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
            if not chunk:
                break
            seen += chunk
    return seen


def _at_prompt(proc: subprocess.Popen, seen: str) -> bool:
    """The reply is over: the output ends with the prompt and nothing follows for a second."""
    return seen.endswith("\n> ") and not select.select([proc.stdout], [], [], 1.0)[0]


def test_ctrl_c_in_chat_stops_the_reply_and_keeps_the_conversation():
    proc = subprocess.Popen([*CLI, "chat", "--max-tokens", "4000", "--max-model-len", "4096", "--temperature", "0.8",
                             "--kv-cache-memory-bytes", str(256 << 20)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "> " in _read_until(proc, "> ", 300)
        proc.stdin.write(b"Write a very long story about the sea.\n")
        proc.stdin.flush()
        assert len(_read_until(proc, " the", 120)) > 2  # the reply is streaming
        proc.send_signal(signal.SIGINT)
        assert "[stopped]" in _read_until(proc, "[stopped]", 60)
        _read_until(proc, "> ", 10)
        proc.stdin.write(b"Thanks. Say hi.\n")
        deadline = time.monotonic() + 30  # then a long answer is stopped like the first
        proc.stdin.flush()
        second = _read_until(proc, " ", 120)
        assert second.strip() and proc.poll() is None  # answering: the conversation went on
        while not _at_prompt(proc, second) and time.monotonic() < deadline:
            second += _read_until(proc, "\n> ", 5)
        if not _at_prompt(proc, second):  # a long answer at temperature 0.8: stopped like the first
            proc.send_signal(signal.SIGINT)
            assert "[stopped]" in _read_until(proc, "[stopped]", 60)
            _read_until(proc, "> ", 10)
        # At the prompt, Ctrl-C ends the chat. It may instead stop a reply that itself printed "\n> " (a quoted
        # line looked like the prompt), or land between a reply's end and the prompt: then again, at the prompt.
        for _ in range(4):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
                break
            except subprocess.TimeoutExpired:
                _read_until(proc, "\n> ", 10)
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        proc.kill()


# ---- 6, 7. no library chatter; start-up phases a line each ------------------------------------------------------

def test_loading_a_checkpoint_warns_of_nothing(tiny_model_dir):
    code = (f"from tokenmill import LLM; LLM({tiny_model_dir('qwen3')!r}, skip_tokenizer_init=True, "
            "kv_cache_memory_bytes=8 << 20, max_model_len=64)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "deprecated" not in out.stderr and "Warning" not in out.stderr
    assert "allocated in" in out.stderr and "engine ready in" in out.stderr


def test_start_up_phases_are_logged_with_their_durations(plain_server):
    log = plain_server.log()
    assert re.search(r"model loaded in [\d.]+ s", log) and re.search(r"KV cache: .* allocated in [\d.]+ s", log)
    assert re.search(r"engine ready in [\d.]+ s", log)
