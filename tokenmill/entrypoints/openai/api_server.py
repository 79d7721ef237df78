"""The OpenAI-compatible HTTP server: a FastAPI app over an AsyncLLM, run by uvicorn.

The server process does the text work (validation, chat templates, tokenization, detokenization,
SSE); the engine core runs in its own process (engine/core_client.py). If the core dies, in-flight
requests fail with 500s or stream error events, /health answers 503, and the server exits with
status 1 a moment later, so a supervisor restarts it instead of it hanging.

SIGTERM or SIGINT drains: the listening socket closes at once (new connections are refused), requests in
flight, streams included, run to their end for up to --shutdown-timeout seconds, then the engine core is
stopped and the process exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.entrypoints.openai.errors import OpenAIError, error_body, error_response, install_error_handlers
from tokenmill.entrypoints.openai.limits import RequestLimits
from tokenmill.entrypoints.openai.metrics import CONTENT_TYPE_LATEST, PrometheusStatLogger
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.entrypoints.openai.serving_chat import OpenAIServingChat, load_chat_template
from tokenmill.entrypoints.openai.serving_completion import OpenAIServingCompletion
from tokenmill.entrypoints.playground import routes as playground_routes

logger = logging.getLogger(__name__)

API_KEY_ENV = "TOKENMILL_API_KEY"
DEAD_EXIT_DELAY_S = 2.0  # time for in-flight requests to receive their errors before the server stops
UNAUTHENTICATED_PATHS = ("/health",)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>`, on every route but /health and, where `is_public` says so, the
    playground's page and static files (pure ASGI: streams pass through)."""

    def __init__(self, app: Any, api_key: str, is_public: Callable[[str], bool] = lambda path: False) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.is_public = is_public

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS or self.is_public(scope["path"])
                or scope["method"] == "OPTIONS"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            response = error_response("Unauthorized: a valid API key is required (Authorization: Bearer KEY)",
                                      HTTPStatus.UNAUTHORIZED)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for a body over max_body_bytes: at once when Content-Length says so, else as soon as the bytes
    received pass it (a chunked body), before the app parses anything (pure ASGI: streams pass through)."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _message(self) -> str:
        return (f"the request body is larger than this server's limit of {self.max_body_bytes} bytes "
                "(--max-request-body-bytes)")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            response = error_response(self._message(), HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return await response(scope, receive, send)
        num_received = 0

        async def limited_receive() -> dict:
            nonlocal num_received
            message = await receive()
            num_received += len(message.get("body", b""))
            if num_received > self.max_body_bytes:
                # FastAPI re-raises HTTPExceptions from body reading; errors.py shapes it like any other
                raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._message())
            return message

        return await self.app(scope, limited_receive, send)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Runs a handler; if the client goes away first, cancels it (its engine requests are aborted)."""
    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # client closed request; nobody reads this


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, which would kill the process before
    the engine core is stopped; here a signal only asks the server to exit, and run_server cleans up."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def build_app(engine: AsyncLLM, served_model_names: list[str], chat_template: str | None = None,
              api_key: str | None = None, tool_call_parser: str | None = None,
              enable_auto_tool_choice: bool | None = None, reasoning_parser: str | None = None,
              limits: RequestLimits = RequestLimits(), playground: bool = True) -> FastAPI:
    """`playground`: serve the web playground at / (its page and static files are public, its data calls are
    the API's own, behind the key)."""
    from tokenmill import __version__

    app = FastAPI(title="tokenmill OpenAI-compatible server", version=__version__)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=limits.max_request_body_bytes)
    if api_key:  # added last, so outermost: a client without the key learns nothing, not even the size limit
        app.add_middleware(ApiKeyMiddleware, api_key=api_key,
                           is_public=playground_routes.is_public if playground else lambda path: False)
    if playground:
        playground_routes.install_playground(app)
    completions = OpenAIServingCompletion(engine, served_model_names, limits)
    chat = OpenAIServingChat(engine, served_model_names, chat_template, tool_call_parser, enable_auto_tool_choice,
                             reasoning_parser, limits)
    stat_logger = PrometheusStatLogger(served_model_names[0], engine.cache_info)
    engine.stat_loggers.append(stat_logger)
    app.state.engine = engine

    @app.get("/health")
    async def health() -> Response:
        if engine.errored:
            return error_response(f"the engine is dead: {engine.dead_error}", HTTPStatus.SERVICE_UNAVAILABLE)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=engine.config.model.model, max_model_len=engine.max_model_len)
                               for name in served_model_names])

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(stat_logger.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await cancel_on_disconnect(raw_request, completions.create_completion(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await cancel_on_disconnect(raw_request, chat.create_chat_completion(request))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        completions.check_model(request.model)
        completions.check_supported(request)
        completions.check_limits(request)
        if isinstance(request, TokenizeChatRequest):
            _, tokens = chat.render(request.messages, request.add_generation_prompt, request.continue_final_message,
                                    request.chat_template_kwargs)
        else:
            tokens = engine.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        completions.check_model(request.model)
        completions.check_supported(request)
        bad = [t for t in request.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise OpenAIError(f"token ids must be in [0, {engine.vocab_size}), got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens))

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        if not await engine.reset_prefix_cache():
            return JSONResponse(error_body("the prefix cache was not reset: some blocks are in use",
                                           HTTPStatus.BAD_REQUEST).model_dump(), status_code=400)
        return Response(status_code=200)

    return app


def playground_url(host: str, port: int) -> str:
    """The page's address to open in a browser: a wildcard bind is reachable at localhost."""
    host = {"0.0.0.0": "localhost", "::": "localhost", "": "localhost"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{playground_routes.PAGE_PATH}"


async def run_server(args: argparse.Namespace, engine: AsyncLLM, sock: socket.socket, names: list[str]) -> int:
    """Serves `engine` on the bound `sock` until stopped (then shuts the engine down); returns the process
    exit status."""
    try:
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        chat_template = load_chat_template(args.chat_template)
        limits = RequestLimits(**{field.name: getattr(args, field.name)
                                  for field in dataclasses.fields(RequestLimits)})
        engine.start()
        app = build_app(engine, names, chat_template, api_key, args.tool_call_parser, args.enable_auto_tool_choice,
                        args.reasoning_parser, limits, playground=not args.disable_playground)
        # uvicorn's graceful shutdown is the drain: listeners close, idle connections close, busy ones finish
        server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                        access_log=not args.disable_uvicorn_access_log, timeout_keep_alive=5,
                                        timeout_graceful_shutdown=args.shutdown_timeout))
        loop = asyncio.get_running_loop()

        def stop_soon(_: Exception) -> None:
            logger.error("engine core is dead: the server stops in %.0f s", DEAD_EXIT_DELAY_S)
            loop.call_later(DEAD_EXIT_DELAY_S, setattr, server, "should_exit", True)

        engine.on_dead.append(stop_soon)
        logger.info("serving %s (max_model_len=%d) with engine core pid %d", ", ".join(names), engine.max_model_len,
                    engine.core_pid)
        if not args.disable_playground:
            logger.info("playground: %s", playground_url(args.host, args.port))
        await server.serve(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()
    if engine.errored:
        logger.error("exiting with status 1: %s", engine.dead_error)
        return 1
    return 0
