"""POST /playground/api/bench: `bench serve` at several request rates against the server it runs in.

One run at a time per server (a second gets a 409: two load tests would measure each other). The load
test runs in its own thread with its own event loop, so its client does not queue behind the server's
own work in this loop; its progress comes back as server-sent events:

    data: {"type": "progress", "rate": 2.0, "done": 3, "total": 8}
    data: {"type": "result", "rate": 2.0, "summary": {...bench serve's JSON, without per-request rows}}
    data: {"type": "error", "message": "..."}          (the run stops)
    data: {"type": "done"}

The benchmark calls this server's own address with the caller's Authorization header, so it can do
nothing the caller could not. A client that goes away stops the run before its next rate.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenmill.entrypoints.openai.errors import error_response
from tokenmill.entrypoints.openai.serving_engine import SSE_HEADERS

MAX_RATES = 8


class BenchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    rates: list[float | Literal["inf"]] = Field(min_length=1, max_length=MAX_RATES)
    num_prompts: int = Field(16, ge=1, le=256)
    input_len: int = Field(32, ge=1, le=8192)
    output_len: int = Field(16, ge=1, le=2048)
    max_concurrency: int | None = Field(None, ge=1, le=1024)

    @field_validator("rates")
    @classmethod
    def _check_rates(cls, rates: list[float | str]) -> list[float | str]:
        for rate in rates:
            if rate != "inf" and not (0 < rate < math.inf):
                raise ValueError(f'each rate must be a positive number of requests per second or "inf", got {rate}')
        return rates


def _self_url(request: Request) -> str:
    """This server's address as the benchmark reaches it: the socket the request came in on."""
    host, port = request.scope["server"]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BenchRunner:
    def __init__(self) -> None:
        self.running = False

    def start(self, request: BenchRequest, raw_request: Request) -> Response:
        if self.running:
            return error_response("a benchmark is already running on this server; wait for it to finish",
                                  HTTPStatus.CONFLICT)
        self.running = True
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict | None] = asyncio.Queue()
        stop = threading.Event()
        api_key = raw_request.headers.get("authorization", "").removeprefix("Bearer ").strip()

        def emit(event: dict | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def run() -> None:
            try:
                self._run(request, _self_url(raw_request), api_key, emit, stop)
            except Exception as e:  # noqa: BLE001 - the page shows why the run stopped
                emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
            finally:
                self.running = False
                emit(None)

        threading.Thread(target=run, name="playground-bench", daemon=True).start()
        return StreamingResponse(self._events(events, stop), media_type="text/event-stream", headers=SSE_HEADERS)

    @staticmethod
    def _run(request: BenchRequest, base_url: str, api_key: str, emit, stop: threading.Event) -> None:
        from tokenmill.entrypoints.cli.bench.serve import benchmark, parse_args

        for rate in request.rates:
            if stop.is_set():
                return
            argv = ["--base-url", base_url, "--num-prompts", str(request.num_prompts), "--request-rate", str(rate),
                    "--input-len", str(request.input_len), "--output-len", str(request.output_len)]
            if request.max_concurrency:
                argv += ["--max-concurrency", str(request.max_concurrency)]
            args = parse_args(argv)
            args.api_key = api_key or None

            def progress(num_done: int, total: int, rate: float | str = rate) -> None:
                emit({"type": "progress", "rate": rate, "done": num_done, "total": total})

            summary = asyncio.run(benchmark(args, progress, describe_client=False))
            summary.pop("requests")
            summary["request_rate"] = rate  # "inf" stays a string: JSON has no infinity
            emit({"type": "result", "rate": rate, "summary": summary})
        emit({"type": "done"})

    @staticmethod
    async def _events(events: asyncio.Queue[dict | None], stop: threading.Event) -> AsyncIterator[str]:
        try:
            while (event := await events.get()) is not None:
                yield f"data: {json.dumps(event)}\n\n"
        finally:
            stop.set()
