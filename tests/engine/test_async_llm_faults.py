"""AsyncLLM when its engine core raises: every request in flight ends with EngineDeadError naming the
exception (none hangs), the on_dead callbacks run once (the server exits through one), and new requests
are refused. (Killing the core process is covered over HTTP in tests/entrypoints/test_reliability_load.py.)"""

from __future__ import annotations

import asyncio

import pytest

from tokenmill import SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.core.interface import EngineCoreRequest
from tokenmill.engine.async_llm import AsyncLLM, EngineDeadError
from tokenmill.sampling_params import RequestOutputKind

NUM_REQUESTS = 6
FAILURE_TIMEOUT_S = 60.0


async def raise_in_core_mid_flight(model_dir: str) -> dict:
    config = EngineConfig.from_kwargs(model=model_dir, dtype="float32", max_model_len=256,
                                      kv_cache_memory_bytes=16 << 20)
    engine = await asyncio.to_thread(AsyncLLM, config)
    deaths: list[EngineDeadError] = []
    engine.on_dead.append(deaths.append)
    engine.start()
    try:
        params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.0, output_kind=RequestOutputKind.DELTA)
        streams = [engine.add_request(f"r{i}", {"prompt_token_ids": [5 + i] * (3 + i)}, params)
                   for i in range(NUM_REQUESTS)]
        for stream in streams:  # every request has produced a token: all of them are in flight
            await anext(stream)
        # A request without a prompt, which the frontend's validation never lets through: the core's
        # add_request raises TypeError, the same path as any exception in the core's loop.
        engine.client.add_request(EngineCoreRequest("malformed", None, SamplingParams(), 0.0))

        async def error_of(stream) -> str | None:
            try:
                async for _ in stream:
                    pass
            except EngineDeadError as e:
                return str(e)
            return None

        errors = await asyncio.wait_for(asyncio.gather(*(error_of(s) for s in streams)), FAILURE_TIMEOUT_S)
        with pytest.raises(EngineDeadError):
            engine.add_request("after", {"prompt_token_ids": [5]}, params)
        await asyncio.to_thread(engine.client.process.join, 10)
        return {"errors": errors, "deaths": deaths, "exit_code": engine.client.process.exitcode,
                "errored": engine.errored}
    finally:
        engine.shutdown()


def test_core_that_raises_fails_every_request_in_flight(tiny_model_dir, record_reliability):
    result = asyncio.run(raise_in_core_mid_flight(tiny_model_dir("llama")))
    told = [e for e in result["errors"] if e and "TypeError" in e and "died unexpectedly" in e]
    record_reliability("engine core raises (in-process AsyncLLM, tiny model)", clients=NUM_REQUESTS,
                       requests=NUM_REQUESTS, lost_requests=NUM_REQUESTS - len(told), server_errors=None,
                       kv_leaked=None, detail=f"{len(told)}/{NUM_REQUESTS} in-flight requests ended with "
                                              f"EngineDeadError naming the TypeError; core exit status "
                                              f"{result['exit_code']}; on_dead ran {len(result['deaths'])} time(s)")
    assert len(told) == NUM_REQUESTS, result["errors"]
    assert result["errored"] and len(result["deaths"]) == 1
    assert result["exit_code"] == 1
