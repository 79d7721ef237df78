"""AsyncLLM: the server's engine. Frontend work in the event loop, the engine core in its own process.

    generate() / add_request(): tokenize + validate (Processor) -> OutputProcessor.add_request
        -> EngineCoreClient (pipe) -> core process
    reader thread -> loop.call_soon_threadsafe(_on_message):
        OutputProcessor.process_outputs (detokenize, stop strings, n > 1) -> per-request asyncio.Queue
        stop strings found here -> abort in the core; SchedulerStats + request timings -> stat loggers

A request's iterator aborts its request when it is closed early (client gone), so its blocks are
freed. If the core process dies, every in-flight iterator raises EngineDeadError, `errored` turns
true and the `on_dead` callbacks run (the server uses one to exit).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenmill.config import EngineConfig
from tokenmill.core.interface import EngineCoreOutput, EngineCoreRequest, SchedulerStats
from tokenmill.engine.core_client import (
    CoreDead,
    CoreMessage,
    CoreOutputs,
    EngineCoreClient,
    EngineDeadError,
    UtilityResult,
)
from tokenmill.engine.dp_client import DPCoreClient, make_core_client
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.processor import Processor, PromptType
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.source import eos_token_ids, load_tokenizer, log_sampling_defaults, resolve_model, sampling_defaults

logger = logging.getLogger(__name__)

UTILITY_TIMEOUT_S = 30.0

__all__ = ["AsyncLLM", "EngineDeadError", "IterationStats", "StatLogger"]


@dataclass
class IterationStats:
    """What one engine step did, as seen by the frontend (times from time.monotonic())."""

    num_prompt_tokens: int = 0  # prompts of requests that got their first token this step
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)  # per new token, since the previous one
    e2e_latencies: list[float] = field(default_factory=list)  # requests that finished this step


class StatLogger(Protocol):
    def record(self, scheduler_stats: SchedulerStats, iteration: IterationStats) -> None: ...


@dataclass
class _RequestTimes:
    arrival_time: float
    num_prompt_tokens: int
    last_token_time: float | None = None


class AsyncLLM:
    """Blocking constructor (spawns the core, loads the tokenizer, waits for the model); then call
    start() inside the running event loop before use."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float | None = None,
                 client: EngineCoreClient | DPCoreClient | None = None) -> None:
        """`client`: a core already started for `config` (a command line starts it before importing this)."""
        self.config = config
        self.client = client or make_core_client(config)
        try:
            # Finding the model and loading the tokenizer overlap with the core importing torch and loading
            # the weights.
            self.source = resolve_model(config.model.model, config.model.revision)
            self.tokenizer = load_tokenizer(self.source, config.model.tokenizer)
            ready = self.client.wait_ready(startup_timeout_s)
        except BaseException:
            self.client.shutdown()
            raise
        self.core_pid = ready.pid
        self.max_model_len = ready.max_model_len
        # vLLM's cache_config_info labels: what the pool holds and how
        self.cache_info = {"block_size": str(ready.block_size), "cache_dtype": config.cache.kv_cache_dtype,
                           "enable_prefix_caching": str(config.cache.enable_prefix_caching),
                           "num_gpu_blocks": str(ready.num_blocks)}
        self.sampling_defaults = sampling_defaults(self.source, config.model.generation_config,
                                                   config.model.override_generation_config)
        log_sampling_defaults(self.sampling_defaults)
        self.vocab_size = self.source.hf_config.vocab_size
        self.processor = Processor(self.tokenizer, self.max_model_len, self.vocab_size,
                                   eos_token_ids(self.source, self.tokenizer))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.scheduler_stats = SchedulerStats()
        self.stat_loggers: list[StatLogger] = []
        self.on_dead: list[Callable[[EngineDeadError], None]] = []
        self.dead_error: EngineDeadError | None = None
        # request id -> its outputs; an exception (engine dead) or None (aborted) ends the stream
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException | None]] = {}
        self._times: dict[str, _RequestTimes] = {}  # core request id ->
        self._utility_futures: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Binds to the running event loop and starts reading the core's outputs."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.client.start_reader(self._post)

    def _post(self, message: CoreMessage) -> None:
        """Reader thread -> event loop."""
        try:
            self._loop.call_soon_threadsafe(self._on_message, message)
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    def shutdown(self) -> None:
        self.client.shutdown()

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    async def check_health(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error

    # ---- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Validates and submits a request now (ValueError for bad input); returns its outputs' iterator.

        The iterator must be consumed or closed; if it never is, call abort_request(request_id). It
        ends early, without a finished output, if the request is aborted by abort_request().
        """
        self.start()
        if self.dead_error is not None:
            raise self.dead_error
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, request = self.processor.process(request_id, prompt, params, arrival_time)
        children = self.output_processor.add_request(request_id, text, request.prompt_token_ids, params)
        queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self._queues[request_id] = queue
        arrival = time.monotonic()
        try:
            for core_id, core_params in children:
                self._times[core_id] = _RequestTimes(arrival, len(request.prompt_token_ids))
                self.client.add_request(EngineCoreRequest(core_id, request.prompt_token_ids, core_params,
                                                          request.arrival_time))
        except EngineDeadError:
            self._forget(request_id)
            raise
        return self._stream(request_id, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if item is None:  # aborted
                    return
                if isinstance(item, BaseException):
                    finished = True  # nothing to abort: the engine is gone
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort_request(request_id)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """vLLM's AsyncLLM.generate: outputs of one request as they come (per params.output_kind)."""
        stream = self.add_request(request_id, prompt, sampling_params)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        self.abort_request(request_id)

    def abort_request(self, request_id: str) -> None:
        """Forgets a request and aborts it in the core (its blocks are freed); a no-op if it is done."""
        core_ids = self._forget(request_id)
        if core_ids and self.dead_error is None:
            try:
                self.client.abort_requests(core_ids)
            except EngineDeadError:
                pass  # the reader thread reports the death

    def _forget(self, request_id: str) -> list[str]:
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(None)
        core_ids = self.output_processor.abort(request_id)
        for core_id in core_ids:
            self._times.pop(core_id, None)
        return core_ids

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.output_processor.parents)

    # ---- utilities -------------------------------------------------------------------------------

    async def _call_utility(self, method: str) -> Any:
        self.start()
        if self.dead_error is not None:
            raise self.dead_error
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._utility_futures[call_id] = future
        try:
            self.client.call_utility(call_id, method)
            return await asyncio.wait_for(future, UTILITY_TIMEOUT_S)
        finally:
            self._utility_futures.pop(call_id, None)

    async def get_stats(self) -> SchedulerStats:
        """A fresh snapshot from the core (`scheduler_stats` holds the last step's, without a round trip)."""
        return await self._call_utility("stats")

    async def reset_prefix_cache(self) -> bool:
        return await self._call_utility("reset_prefix_cache")

    # ---- messages from the core (in the event loop) ----------------------------------------------

    def _on_message(self, message: CoreMessage) -> None:
        try:
            if isinstance(message, CoreOutputs):
                self._on_outputs(message)
            elif isinstance(message, UtilityResult):
                future = self._utility_futures.get(message.call_id)
                if future is not None and not future.done():
                    if message.error is not None:
                        future.set_exception(RuntimeError(message.error))
                    else:
                        future.set_result(message.result)
            elif isinstance(message, CoreDead):
                self._on_dead(EngineDeadError(message.message))
        except Exception as e:  # noqa: BLE001 - a frontend bug must not leave requests hanging
            logger.exception("processing engine core outputs failed")
            self.client.shutdown()
            self._on_dead(EngineDeadError(f"processing engine core outputs failed: {e!r}"))

    def _on_outputs(self, message: CoreOutputs) -> None:
        iteration = self._time_outputs(message.outputs)
        request_outputs, to_abort = self.output_processor.process_outputs(message.outputs)
        for output in request_outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        if to_abort:  # stop strings: the core does not know they ended
            self._finish_times(to_abort, iteration)
            self.client.abort_requests(to_abort)
        self.scheduler_stats = message.stats
        for stat_logger in self.stat_loggers:
            stat_logger.record(message.stats, iteration)

    def _time_outputs(self, outputs: list[EngineCoreOutput]) -> IterationStats:
        now = time.monotonic()
        iteration = IterationStats()
        for out in outputs:
            times = self._times.get(out.request_id)
            if times is None:
                continue
            num_new = len(out.new_token_ids)
            if num_new:
                if times.last_token_time is None:
                    iteration.num_prompt_tokens += times.num_prompt_tokens
                    iteration.time_to_first_tokens.append(now - times.arrival_time)
                else:
                    iteration.inter_token_latencies.extend([(now - times.last_token_time) / num_new] * num_new)
                times.last_token_time = now
                iteration.num_generation_tokens += num_new
            if out.finished:
                self._finish_times([out.request_id], iteration)
        return iteration

    def _finish_times(self, core_ids: list[str], iteration: IterationStats) -> None:
        now = time.monotonic()
        for core_id in core_ids:
            times = self._times.pop(core_id, None)
            if times is not None:
                iteration.e2e_latencies.append(now - times.arrival_time)

    def _on_dead(self, error: EngineDeadError) -> None:
        if self.dead_error is not None:
            return
        logger.error("%s; failing %d in-flight requests", error, len(self._queues))
        self.dead_error = error
        for queue in self._queues.values():
            queue.put_nowait(error)
        for future in self._utility_futures.values():
            if not future.done():
                future.set_exception(error)
        for callback in self.on_dead:
            callback(error)
