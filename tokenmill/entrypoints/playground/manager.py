"""`tokenmill playground`: a small server that starts, stops and switches `tokenmill serve` engines.

    browser --/playground/--------> this server: the page (mode "manager")
            --/api/engines-------->   start (POST), list (GET), stop (DELETE /api/engines/{id}),
                                      follow a log (GET /api/engines/{id}/logs, server-sent events)
            --/engines/{id}/...--->   proxied, streams included, to that engine's http://127.0.0.1:{port}/...

Each engine is a `tokenmill serve` subprocess on a free local port; its flags are checked with serve's own
parser before it starts (a bad flag is a 400 naming it), and its output is kept (the last MAX_LOG_LINES
lines) for the page. The page reaches engines only through the proxy, so an engine needs no CORS and no
public port. With --api-key, the key guards this server's API and proxy like serve's, and every engine it
starts gets the same key. A client that goes away closes its proxied request, and the engine aborts it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from http import HTTPStatus

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tokenmill.entrypoints.openai.api_server import API_KEY_ENV, ApiKeyMiddleware
from tokenmill.entrypoints.openai.errors import OpenAIError, install_error_handlers
from tokenmill.entrypoints.openai.serving_engine import SSE_HEADERS
from tokenmill.entrypoints.playground import routes

MAX_LOG_LINES = 5000
LOG_POLL_S = 0.25
HEALTH_POLL_S = 0.5
STOP_TIMEOUT_S = 30.0
_MANAGED_FLAGS = ("--host", "--port", "--api-key")  # this server sets them
_PROXIED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
_PROXIED_RESPONSE_HEADERS = ("content-type", "cache-control")


class StartEngineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=1000, description="path, .gguf file or hub id; none: the embedded one")
    args: list[str] = Field(default_factory=list, max_length=64, description="more `tokenmill serve` flags")


class _RefusingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise OpenAIError(f"args: {message}", param="args")


def check_serve_args(model: str | None, args: list[str]) -> None:
    """Parses the command line with `tokenmill serve`'s own parser; a bad flag is an OpenAIError naming it."""
    from tokenmill.entrypoints.cli import serve

    for flag in _MANAGED_FLAGS:
        if any(arg == flag or arg.startswith(f"{flag}=") for arg in args):
            raise OpenAIError(f"args: {flag} is set by `tokenmill playground`, not per engine", param="args")
    parser = _RefusingParser(prog="tokenmill")
    serve.register(parser.add_subparsers(dest="command", parser_class=_RefusingParser))
    parser.parse_args(["serve", *([model] if model else []), *args])


class EngineProcess:
    """One `tokenmill serve` subprocess: its output lines (kept by a reader thread) and whether it is ready."""

    def __init__(self, engine_id: str, model: str | None, args: list[str], port: int, api_key: str | None) -> None:
        self.id = engine_id
        self.model = model or "default"
        self.args = args
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready = False
        self.lines: collections.deque[str] = collections.deque(maxlen=MAX_LOG_LINES)
        self.num_lines = 0  # ever written: a follower's position survives the deque dropping old lines
        self.log_closed = False  # the process exited and all its output is in `lines`
        command = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", *([model] if model else []),
                   "--host", "127.0.0.1", "--port", str(port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop(API_KEY_ENV, None)
        if api_key:
            env[API_KEY_ENV] = api_key
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        self._append(f"$ tokenmill serve {' '.join(command[4:])}")
        threading.Thread(target=self._read, name=f"engine-{engine_id}-log", daemon=True).start()

    def _append(self, line: str) -> None:
        self.lines.append(line)
        self.num_lines += 1

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._append(raw.decode(errors="replace").rstrip("\n"))
        self._append(f"[exited with status {self.proc.wait()}]")
        self.log_closed = True

    @property
    def status(self) -> str:
        if self.proc.poll() is not None:
            return f"exited ({self.proc.returncode})"
        return "ready" if self.ready else "starting"

    def describe(self) -> dict:
        return {"id": self.id, "model": self.model, "args": self.args, "port": self.port, "status": self.status}

    def lines_since(self, position: int) -> tuple[list[str], int]:
        """The lines written after `position` that are still kept, and the new position."""
        first_kept = self.num_lines - len(self.lines)
        return list(self.lines)[max(position - first_kept, 0):], self.num_lines

    async def watch_health(self, client: httpx.AsyncClient) -> None:
        while self.proc.poll() is None and not self.ready:
            with contextlib.suppress(httpx.HTTPError):
                self.ready = (await client.get(f"{self.url}/health", timeout=2)).status_code == 200
            await asyncio.sleep(HEALTH_POLL_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # serve drains, then stops its engine core
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineManager:
    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.engines: dict[str, EngineProcess] = {}
        self._ids = itertools.count(1)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        self._watchers: set[asyncio.Task] = set()

    def get(self, engine_id: str) -> EngineProcess:
        if engine_id not in self.engines:
            raise OpenAIError(f"no engine {engine_id!r} (GET /api/engines lists them)", HTTPStatus.NOT_FOUND)
        return self.engines[engine_id]

    def start(self, request: StartEngineRequest) -> EngineProcess:
        check_serve_args(request.model, request.args)
        engine = EngineProcess(f"e{next(self._ids)}", request.model, request.args, _free_port(), self.api_key)
        self.engines[engine.id] = engine
        watcher = asyncio.create_task(engine.watch_health(self.client))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return engine

    async def stop(self, engine_id: str) -> None:
        engine = self.get(engine_id)
        await asyncio.to_thread(engine.stop)
        self.engines.pop(engine_id, None)

    def stop_all(self) -> None:
        for engine in self.engines.values():
            if engine.proc.poll() is None:
                engine.proc.send_signal(signal.SIGINT)
        for engine in self.engines.values():
            engine.stop()

    async def follow_log(self, engine: EngineProcess) -> AsyncIterator[str]:
        position = 0
        while True:
            lines, position = engine.lines_since(position)
            for line in lines:
                yield f"data: {json.dumps({'line': line})}\n\n"
            if not lines and engine.log_closed:
                return
            await asyncio.sleep(LOG_POLL_S)

    async def proxy(self, engine: EngineProcess, path: str, request: Request) -> Response:
        headers = {name: request.headers[name] for name in _PROXIED_REQUEST_HEADERS if name in request.headers}
        query = f"?{request.url.query}" if request.url.query else ""
        upstream_request = self.client.build_request(request.method, f"{engine.url}/{path}{query}", headers=headers,
                                                     content=await request.body())
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.HTTPError as e:
            raise OpenAIError(f"engine {engine.id} ({engine.model}, {engine.status}) is not reachable: {e}",
                              HTTPStatus.BAD_GATEWAY) from None

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:  # also when the browser went away: closing the upstream stream makes the engine abort
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()

        return StreamingResponse(body(), status_code=upstream.status_code, headers={
            name: upstream.headers[name] for name in _PROXIED_RESPONSE_HEADERS if name in upstream.headers})


def build_manager_app(manager: EngineManager) -> FastAPI:
    app = FastAPI(title="tokenmill playground")
    install_error_handlers(app)
    if manager.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=manager.api_key, is_public=routes.is_public)
    routes.install_page(app, "manager")

    @app.get("/api/engines")
    async def list_engines() -> list[dict]:
        return [engine.describe() for engine in manager.engines.values()]

    @app.post("/api/engines")
    async def start_engine(request: StartEngineRequest) -> dict:
        return manager.start(request).describe()

    @app.delete("/api/engines/{engine_id}")
    async def stop_engine(engine_id: str) -> Response:
        await manager.stop(engine_id)
        return Response(status_code=204)

    @app.get("/api/engines/{engine_id}/logs")
    async def engine_logs(engine_id: str) -> Response:
        return StreamingResponse(manager.follow_log(manager.get(engine_id)), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    @app.api_route("/engines/{engine_id}/{path:path}", methods=["GET", "POST", "DELETE"])
    async def proxy(engine_id: str, path: str, request: Request) -> Response:
        return await manager.proxy(manager.get(engine_id), path, request)

    return app


def run_manager(args: argparse.Namespace) -> int:
    from tokenmill.entrypoints.cli.serve import listen_socket
    from tokenmill.entrypoints.openai.api_server import playground_url

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    sock = listen_socket(args.host, args.port)
    manager = EngineManager(api_key)
    app = build_manager_app(manager)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=5))
    print(f"tokenmill playground: open {playground_url(args.host, args.port)}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        manager.stop_all()
        sock.close()
    return 0
