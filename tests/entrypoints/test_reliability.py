"""Reliability and security of the OpenAI server: hostile request bodies, hand-written and generated from the
server's own OpenAPI schema (schemathesis), request-size limits, the API key on every route, and a graceful
drain on SIGTERM. Real `tokenmill serve` processes (conftest.py)."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import signal
import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tokenmill.entrypoints.openai import api_server
from tokenmill.entrypoints.playground.routes import is_public

MODEL = "SmolLM2-135M-Instruct"
VOCAB_SIZE = 49152
MAX_MODEL_LEN = 512  # the servers' --max-model-len (conftest.py)
API_KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY_BYTES = 2 << 20  # the hostile server's --max-request-body-bytes: a 1 MB prompt fits, 3 MB does not
TIMEOUT_S = 60.0  # no hostile body may hang the server

COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
ONE_MB_PROMPT = "hello world " * ((1 << 20) // 12)  # ~1 MB, ~175k tokens: far beyond max_model_len


def nested_lists(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a": ' * depth + b"{}" + b"}" * depth


def case(path: str, body: dict | bytes, status: int, param: str | None, message: str, name: str):
    return pytest.param(path, body, status, param, message, id=f"{path.rsplit('/', 1)[-1]}-{name}")


HOSTILE_CASES = [
    # ---- sizes: limits named in the message; a long prompt is a 400 about the context length
    case("/v1/completions", {**COMPLETION, "n": 10**9}, 400, "n", "at most 128", "huge-n"),
    case("/v1/completions", {**COMPLETION, "max_tokens": 10**12}, 400, "max_tokens", "maximum context length",
         "huge-max-tokens"),
    case("/v1/completions", {**COMPLETION, "max_tokens": 10**40}, 400, "max_tokens", "maximum context length",
         "max-tokens-beyond-int64"),
    case("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**12}, 400, "max_tokens",
         "maximum context length", "chat-huge-max-tokens"),
    case("/v1/chat/completions", {**CHAT, "n": 10**9}, 400, "n", "at most 128", "chat-huge-n"),
    # accepted as a body (under the size limit); refused because it tokenizes beyond max_model_len
    case("/v1/completions", {**COMPLETION, "prompt": ONE_MB_PROMPT}, 400, "messages", "maximum context length",
         "1mb-prompt"),
    case("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": ONE_MB_PROMPT}]}, 400,
         "messages", "maximum context length", "chat-1mb-prompt"),
    case("/v1/completions", {**COMPLETION, "prompt": "x" * (3 << 20)}, 413, None, "request body", "over-size-limit"),
    case("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * (3 << 20)}]}, 413, None,
         "request body", "chat-over-size-limit"),
    case("/tokenize", {"prompt": "x" * (3 << 20)}, 413, None, "request body", "over-size-limit"),
    case("/v1/completions", {**COMPLETION, "stop": [f"s{i}" for i in range(1000)]}, 400, "stop", "at most 256",
         "1000-stop-strings"),
    case("/v1/chat/completions", {**CHAT, "stop": [f"s{i}" for i in range(1000)]}, 400, "stop", "at most 256",
         "chat-1000-stop-strings"),
    case("/v1/completions", {**COMPLETION, "stop": "x" * 1025}, 400, "stop", "at most 1024 characters",
         "stop-string-1025-chars"),
    case("/v1/chat/completions", {**CHAT, "stop": ["ok", "y" * (1 << 20)]}, 400, "stop", "at most 1024 characters",
         "chat-1mb-stop-string"),
    case("/v1/completions", {**COMPLETION, "stop_token_ids": list(range(1000))}, 400, "stop_token_ids",
         "at most 256", "1000-stop-token-ids"),
    case("/v1/completions", {**COMPLETION, "stop_token_ids": [10**20]}, 400, "stop_token_ids", "", "huge-stop-id"),
    # ---- deep nesting: beyond the JSON parser's recursion, and deep where the server walks the value
    case("/v1/completions", b'{"prompt": ' + nested_lists(10_000) + b"}", 400, None, "nest", "nested-prompt"),
    case("/v1/completions", b'{"prompt": "Hi", "logit_bias": ' + nested_objects(10_000) + b"}", 400, None, "nest",
         "nested-logit-bias"),
    case("/v1/chat/completions", b'{"messages": ' + nested_lists(10_000) + b"}", 400, None, "nest",
         "nested-messages"),
    case("/tokenize", b'{"prompt": ' + nested_objects(10_000) + b"}", 400, None, "nest", "nested"),
    case("/detokenize", b'{"tokens": ' + nested_lists(10_000) + b"}", 400, None, "nest", "nested"),
    case("/v1/completions", b'{"prompt": "Hi", "max_tokens": 4, "structured_outputs": {"json": '
         + nested_objects(500) + b"}}", 400, "structured_outputs", "nest", "nested-schema-500"),
    case("/v1/chat/completions", json.dumps(CHAT)[:-1].encode() + b', "response_format": {"type": "json_schema", '
         b'"json_schema": {"schema": ' + nested_objects(500) + b"}}}", 400, "response_format", "nest",
         "nested-response-format-500"),
    case("/v1/chat/completions", json.dumps(CHAT)[:-1].encode() + b', "chat_template_kwargs": '
         + nested_objects(500) + b"}", 400, "chat_template_kwargs", "nest", "nested-template-kwargs-500"),
    case("/tokenize", b'{"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": '
         + nested_objects(500) + b"}", 400, "chat_template_kwargs", "nest", "nested-template-kwargs-500"),
    # ---- wrong types for the main fields: 400 naming the field, never FastAPI's 422
    case("/v1/completions", {**COMPLETION, "prompt": 12345}, 400, "prompt", "valid", "prompt-int"),
    case("/v1/completions", {**COMPLETION, "prompt": {"text": "Hi"}}, 400, "prompt", "valid", "prompt-dict"),
    case("/v1/completions", {**COMPLETION, "prompt": [1.5, 2]}, 400, "prompt", "valid", "prompt-floats"),
    case("/v1/completions", {**COMPLETION, "prompt": ["Hi", 3]}, 400, "prompt", "valid", "prompt-mixed"),
    case("/v1/chat/completions", {**CHAT, "messages": "Hi"}, 400, "messages", "valid", "messages-string"),
    case("/v1/chat/completions", {**CHAT, "messages": ["Hi"]}, 400, "messages", "valid", "messages-of-strings"),
    case("/v1/chat/completions", {**CHAT, "messages": [{"content": "Hi"}]}, 400, "messages", "role", "no-role"),
    case("/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature", "number", "temperature-str"),
    case("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature", "number", "temperature-str"),
    case("/v1/completions", {**COMPLETION, "stop": {"a": "b"}}, 400, "stop", "valid", "stop-dict"),
    case("/v1/completions", {**COMPLETION, "stop": [""]}, 400, "stop", "non-empty", "stop-empty-string"),
    case("/v1/completions", {**COMPLETION, "n": 1.5}, 400, "n", "integer", "n-float"),
    case("/v1/completions", {**COMPLETION, "n": "2"}, 400, "n", "integer", "n-string"),
    case("/v1/completions", {**COMPLETION, "n": -1}, 400, "n", ">= 1", "n-negative"),
    case("/v1/completions", {**COMPLETION, "max_tokens": 2.5}, 400, "max_tokens", "integer", "max-tokens-float"),
    case("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream", "boolean", "stream-string"),
    case("/v1/completions", {**COMPLETION, "top_k": -5}, 400, "top_k", "top_k", "top-k-negative"),
    case("/v1/completions", {**COMPLETION, "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids",
         "logit-bias-key"),
    case("/v1/completions", {**COMPLETION, "logit_bias": [1, 2]}, 400, "logit_bias", "valid", "logit-bias-list"),
    case("/v1/completions", {**COMPLETION, "logit_bias": {"5": "up"}}, 400, "logit_bias", "number",
         "logit-bias-value-str"),
    case("/v1/completions", {**COMPLETION, "logit_bias": {str(VOCAB_SIZE): 1}}, 400, "logit_bias",
         "outside the vocabulary", "logit-bias-oov"),
    case("/v1/completions", {**COMPLETION, "logit_bias": {"-1": 1}}, 400, "logit_bias", "outside the vocabulary",
         "logit-bias-negative-id"),
    # (finite biases outside [-100, 100] are clamped to it, as vLLM does: not a hostile input)
    case("/tokenize", {"prompt": 5}, 400, "prompt", "valid", "prompt-int"),
    case("/tokenize", {"messages": "Hi"}, 400, "messages", "valid", "messages-string"),
    case("/tokenize", {}, 400, None, "required", "empty-body"),
    case("/detokenize", {"tokens": "abc"}, 400, "tokens", "valid", "tokens-string"),
    case("/detokenize", {"tokens": [10**30]}, 400, "tokens", "token ids must be in", "huge-token"),
    case("/detokenize", {"tokens": [VOCAB_SIZE]}, 400, "tokens", "token ids must be in", "oov-token"),
    case("/v1/completions", b"[1, 2, 3]", 400, None, "valid dictionary", "body-is-a-list"),
    case("/v1/completions", b"null", 400, None, "", "body-is-null"),
    case("/v1/completions", b"\xff\xfe not utf-8", 400, None, "", "body-not-utf8"),
    # ---- NaN / Infinity literals (Python's json accepts them): every float field refuses them
    case("/v1/completions", b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature", "finite", "temperature-nan"),
    case("/v1/completions", b'{"prompt": "Hi", "top_p": -Infinity}', 400, "top_p", "finite", "top-p-neg-inf"),
    case("/v1/completions", b'{"prompt": "Hi", "presence_penalty": NaN}', 400, "presence_penalty", "finite",
         "presence-penalty-nan"),
    case("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "frequency_penalty": Infinity}',
         400, "frequency_penalty", "finite", "frequency-penalty-inf"),
    case("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "min_p": NaN}', 400, "min_p",
         "finite", "min-p-nan"),
    case("/v1/completions", b'{"prompt": "Hi", "repetition_penalty": Infinity}', 400, "repetition_penalty",
         "finite", "repetition-penalty-inf"),
    case("/v1/completions", b'{"prompt": "Hi", "max_tokens": NaN}', 400, "max_tokens", "", "max-tokens-nan"),
    case("/v1/completions", b'{"prompt": "Hi", "n": Infinity}', 400, "n", "", "n-inf"),
    case("/v1/completions", b'{"prompt": "Hi", "logit_bias": {"5": -Infinity}}', 400, "logit_bias", "finite",
         "logit-bias-neg-inf"),
    # ---- unicode: a lone surrogate cannot be encoded to UTF-8 for the tokenizer
    case("/v1/completions", b'{"prompt": "Hi \\ud800 there", "max_tokens": 2}', 400, "prompt", "surrogate",
         "lone-surrogate"),
    case("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', 400,
         "messages", "surrogate", "lone-surrogate"),
    case("/v1/completions", b'{"prompt": "Hi", "stop": ["\\ud800"], "max_tokens": 2}', 400, "stop", "surrogate",
         "stop-lone-surrogate"),
    case("/tokenize", b'{"prompt": "\\ud800"}', 400, "prompt", "surrogate", "lone-surrogate"),
    # ---- chat structure
    case("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least one message", "no-messages"),
    case("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages",
         "role", "unknown-role"),
    case("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
         400, "messages", "only text", "unknown-part-type"),
    case("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"text": "Hi"}]}]}, 400,
         "messages", "type", "part-without-type"),
    case("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages", "valid",
         "content-int"),
    case("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
         "between 0 and 20", "top-logprobs-21"),
    case("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 10**9}, 400, "top_logprobs",
         "between 0 and 20", "top-logprobs-huge"),
    case("/v1/completions", {**COMPLETION, "logprobs": 10**9}, 400, "logprobs", "between 0 and 20", "logprobs-huge"),
    case("/v1/chat/completions", {**CHAT, "tools": "all"}, 400, "tools", "valid", "tools-string"),
    case("/v1/chat/completions", {**CHAT, "tools": [5]}, 400, "tools", "valid", "tools-int"),
    case("/tokenize", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages", "role", "unknown-role"),
    case("/tokenize", {"messages": []}, 400, "messages", "at least one message", "no-messages"),
]


@pytest.fixture(scope="module")
def hostile_server(start_server):
    """One server for the hostile bodies and the route walk: a small body limit, and --api-key."""
    return start_server(["--max-request-body-bytes", str(MAX_BODY_BYTES), "--api-key", API_KEY])


def post(url: str, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=TIMEOUT_S)
    return httpx.post(url, json=body, headers=AUTH, timeout=TIMEOUT_S)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:2000]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    return error


def serve_one(url: str) -> httpx.Response:
    """A normal small request, through the whole engine (one token keeps it quick on CPU)."""
    return post(f"{url}/v1/completions", {**COMPLETION, "max_tokens": 1})


def assert_served(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def assert_still_serving(url: str) -> None:
    assert_served(serve_one(url))


@pytest.mark.parametrize("path, body, status, param, message", HOSTILE_CASES)
def test_hostile_bodies(hostile_server, path, body, status, param, message, record_reliability):
    response = post(f"{hostile_server.url}{path}", body)
    after = serve_one(hostile_server.url)
    record_reliability("hostile bodies (hand-written), each followed by a normal request", bodies=1, requests=2,
                       lost_requests=int(response.status_code != status) + int(after.status_code != 200),
                       server_errors=int(response.status_code >= 500) + int(after.status_code >= 500))
    error = assert_openai_error(response, status)
    assert message.lower() in error["message"].lower(), error
    if param is not None:
        assert error["param"] == param, error
    assert_served(after)


def test_unknown_fields_named_like_limited_ones_are_ignored(hostile_server):
    """Unknown fields are accepted and ignored; an "n" that is a dict once gave /tokenize a 500 (schemathesis)."""
    extra = {"n": {"a": 1}, "stop": [1, [2]], "stop_token_ids": "x", "tools": 5}
    response = post(f"{hostile_server.url}/tokenize", {"prompt": "Hi", **extra})
    assert response.status_code == 200 and response.json()["count"] >= 1, response.text
    response = post(f"{hostile_server.url}/detokenize", {"tokens": [1, 2], **extra})
    assert response.status_code == 200, response.text


def test_stop_string_at_the_length_limit_is_served(hostile_server):
    body = {**COMPLETION, "max_tokens": 1, "stop": ["z" * 1024, "ok"]}
    assert_served(post(f"{hostile_server.url}/v1/completions", body))


# ---- fuzzing: bodies generated from the server's own OpenAPI schema -----------------------------------

FUZZ_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
FUZZ_EXAMPLES = 30  # per route and generation mode: about a minute for all four routes on a 2-core CPU
FUZZ_MAX_TOKENS = 2
FUZZ_MAX_N = 2


@pytest.fixture(scope="module")
def openapi_schema(hostile_server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{hostile_server.url}/openapi.json", headers=AUTH, timeout=TIMEOUT_S)


def keep_cheap(path: str, body: Any) -> Any:
    """Caps what a generated body may cost on CPU: a valid (or null, or missing: "fill the context") token
    budget becomes at most FUZZ_MAX_TOKENS and a valid n at most FUZZ_MAX_N, and a named model is the served
    one. Values the server must refuse (negative, huge, of the wrong type) are left for it to refuse."""
    if not isinstance(body, dict):
        return body
    if path.startswith("/v1/") and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = FUZZ_MAX_TOKENS
    for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        value = body.get(name)
        if name in body and (value is None or type(value) is int and 1 <= value <= MAX_MODEL_LEN):
            body[name] = min(value or FUZZ_MAX_TOKENS, FUZZ_MAX_TOKENS)
    if type(body.get("n")) is int and 1 <= body["n"] <= 128:
        body["n"] = min(body["n"], FUZZ_MAX_N)
    if "model" in body:
        body["model"] = MODEL
    return body


def fuzz_failure(response: requests.Response | schemathesis.Response) -> str | None:
    """What is wrong with an answer to a generated body: a 5xx, a 4xx not in OpenAI's error shape, or an
    error event inside a 200 stream."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"{response.status_code} without an OpenAI error body: {response.text[:300]}"
        return None
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: {")]
    errors = [event for event in events if '"error"' in event[:10]]
    return f"an error event in a 200 stream: {errors[0][:300]}" if errors else None


@pytest.mark.parametrize("path", FUZZ_ROUTES)
def test_schemathesis_bodies_never_get_a_5xx(hostile_server, openapi_schema, path, record_reliability):
    """Bodies the schema allows and bodies it forbids (schemathesis' positive and negative modes), derandomized
    so that CI runs the same ones: each gets a 2xx or an OpenAI-shaped 4xx within TIMEOUT_S, never a 5xx."""
    operation = openapi_schema[path]["POST"]
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            # Failures are collected, not raised: hypothesis would shrink them by sending many more bodies.
            case.body = keep_cheap(path, case.body)
            try:
                response = case.call(base_url=hostile_server.url, headers=AUTH, timeout=TIMEOUT_S)
            except requests.RequestException as e:  # a hang (timeout) or a crash (connection refused)
                failures.append(f"{type(e).__name__} for {case.body!r:.300}")
                statuses["no answer"] += 1
                return
            statuses[response.status_code] += 1
            failure = fuzz_failure(response)
            if failure:
                failures.append(f"{failure} for {case.body!r:.300}")

        fuzz()
    alive = hostile_server.proc.poll() is None
    idle = hostile_server.wait_idle(headers=AUTH) if alive else {}
    record_reliability(f"schemathesis on {path} (positive and negative bodies)", bodies=sum(statuses.values()),
                       requests=sum(statuses.values()), lost_requests=len(failures) + (not alive),
                       server_errors=sum(n for status, n in statuses.items() if status >= 500),
                       kv_leaked=idle.get("vllm:kv_cache_usage_perc"),
                       detail="statuses " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str)))
    assert alive, hostile_server.log()[-3000:]
    assert idle["vllm:kv_cache_usage_perc"] == 0, idle
    assert not failures, "\n".join(failures[:10])
    assert_still_serving(hostile_server.url)


def test_chunked_body_over_the_limit_is_413(hostile_server):
    """No Content-Length to refuse up front: the body is counted as it arrives."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(3):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(f"{hostile_server.url}/v1/completions", content=chunks(),
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=TIMEOUT_S)
    assert "request body" in assert_openai_error(response, 413)["message"]
    assert_still_serving(hostile_server.url)


def test_limit_flags_defaults():
    from tokenmill.entrypoints.cli.serve import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert (args.max_request_body_bytes, args.max_n, args.max_stop_strings, args.max_stop_string_length,
            args.max_json_depth, args.shutdown_timeout) == (16 << 20, 128, 256, 1024, 64, 30.0)


# ---- the API key on every route ------------------------------------------------------------------------

def registered_routes() -> tuple[list[tuple[str, str]], set[str]]:
    """(method, path) of every route build_app registers, and the paths OpenAPI lists, from an app built
    in-process on a stub engine (the routes do not depend on the engine)."""
    engine = SimpleNamespace(tokenizer=None, max_model_len=MAX_MODEL_LEN, stat_loggers=[], cache_info={})
    app = api_server.build_app(engine, [MODEL], api_key=API_KEY)
    routes = sorted((method, route.path) for route in app.routes for method in getattr(route, "methods", ()))
    return routes, {route.path for route in app.routes if getattr(route, "include_in_schema", False)}


def test_api_key_guards_every_route_but_health_and_the_playground_page(hostile_server):
    url = hostile_server.url
    routes, schema_paths = registered_routes()
    # the in-process app is the served one: same OpenAPI paths
    assert set(httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=TIMEOUT_S).json()["paths"]) == schema_paths
    assert {("POST", "/v1/completions"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
            ("POST", "/reset_prefix_cache")} <= set(routes)
    wrong_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                     {"Authorization": f"Bearer {API_KEY}x"}, {"X-Api-Key": API_KEY}]
    client = httpx.Client(timeout=TIMEOUT_S)
    for method, path in routes:
        body = {} if method == "POST" else None
        for headers in wrong_headers:
            response = client.request(method, f"{url}{path}", headers=headers, json=body)
            if path == "/health" or is_public(path):  # the playground's page: no data, its calls need the key
                assert response.status_code in (200, 307), (method, path, headers)
                continue
            assert response.status_code == 401, (method, path, headers, response.status_code)
            if method != "HEAD":
                assert assert_openai_error(response, 401)["type"] == "AuthenticationError"
        response = client.request(method, f"{url}{path}", headers=AUTH, json=body)
        assert response.status_code != 401 and response.status_code < 500, (method, path, response.text[:500])
    assert ("POST", "/playground/api/bench") in routes  # the playground's one data route is guarded like /v1
    static = httpx.get(f"{url}/playground/static/js/app.js", timeout=TIMEOUT_S)
    assert static.status_code == 200 and "javascript" in static.headers["content-type"]
    # only the static folder is public: a path that climbs out of it is not
    assert httpx.get(f"{url}/playground/static/../../metrics", timeout=TIMEOUT_S).status_code in (401, 404)
    # routes that do not exist answer 401 too: no probing the route table without the key
    assert httpx.get(f"{url}/v1/nothing", timeout=TIMEOUT_S).status_code == 401
    assert httpx.get(f"{url}/v1/nothing", headers=AUTH, timeout=TIMEOUT_S).status_code == 404


def test_api_key_comparison_is_constant_time(monkeypatch):
    calls = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(api_server.hmac, "compare_digest", spy)
    sent = []

    async def app(scope, receive, send) -> None:
        sent.append("app")

    async def send(message: dict) -> None:
        sent.append(message.get("status"))

    middleware = api_server.ApiKeyMiddleware(app, API_KEY)
    for key, answer in ((API_KEY, "app"), ("wrong", 401)):
        scope = {"type": "http", "path": "/v1/models", "method": "GET",
                 "headers": [(b"authorization", f"Bearer {key}".encode())]}
        sent.clear()
        asyncio.run(middleware(scope, None, send))
        assert sent[0] == answer
        assert calls[-1] == (f"Bearer {key}".encode(), f"Bearer {API_KEY}".encode())


# ---- graceful shutdown ---------------------------------------------------------------------------------

NUM_DRAIN_TOKENS = 128  # long enough (ignore_eos) that the drain is observed while it streams, even on a fast machine
DRAIN_LIMIT_S = 600  # --shutdown-timeout: far above the stream's length even on a loaded 2-core machine


def test_sigterm_drains_the_stream_in_flight_then_exits_0(start_server):
    # the key from the environment this time (TOKENMILL_API_KEY), not --api-key
    server = start_server(["--shutdown-timeout", str(DRAIN_LIMIT_S)], env={"TOKENMILL_API_KEY": API_KEY})
    assert httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT_S).status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=TIMEOUT_S).status_code == 200
    events: list[str] = []
    first_event = threading.Event()

    def consume() -> None:
        body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": NUM_DRAIN_TOKENS,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH,
                          timeout=TIMEOUT_S) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    first_event.set()

    streamer = threading.Thread(target=consume)
    streamer.start()
    assert first_event.wait(TIMEOUT_S)
    server.proc.send_signal(signal.SIGTERM)
    # during the drain new requests are refused (connection refused, or a 503)
    deadline = time.monotonic() + 10
    while True:
        try:
            status = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers=AUTH, timeout=5).status_code
        except (httpx.ConnectError, httpx.RemoteProtocolError):
            status = None
        if status in (None, 503):
            break
        assert time.monotonic() < deadline, "new requests are still served 10 s after SIGTERM"
        time.sleep(0.05)
    assert streamer.is_alive(), "the stream ended before the drain was observed: make NUM_DRAIN_TOKENS larger"
    streamer.join(DRAIN_LIMIT_S)
    assert server.proc.wait(DRAIN_LIMIT_S) == 0
    # the stream in flight ran to its end: every token, one finish_reason, then [DONE]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, server.log()[-3000:]
    chunks = [json.loads(event) for event in events[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    finish_reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and
                      c["choices"][0]["finish_reason"]]
    assert finish_reasons == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == NUM_DRAIN_TOKENS
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
