"""EngineCore: the step loop, schedule -> execute -> update. It sees token ids, never text."""

from __future__ import annotations

import enum
import gc
import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from tokenmill.config import EngineConfig, num_routed_experts
from tokenmill.core.interface import (
    EngineCoreOutput,
    EngineCoreRequest,
    ModelRunnerOutput,
    SchedulerOutput,
    SchedulerStats,
)
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.executor import make_executor
from tokenmill.metrics import step_timer
from tokenmill.source import ModelSource, load_tokenizer
from tokenmill.structured import grammar
from tokenmill.structured.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class StepPhase(enum.Enum):
    LAUNCHED = "forward pass queued"
    SAMPLED = "sampling queued"


@dataclass
class InFlightStep:
    """One scheduled step, from its launch to the scheduler's update of its requests.

        scheduler.schedule()
          -> worker.execute_model()      LAUNCHED: forward pass queued on the device
          -> worker.sample_tokens(mask)  SAMPLED: sampling and the copy of its tokens to the host queued
          -> worker.finish_step()        tokens on the host
          -> grammars accept the tokens, scheduler.update_from_output()

    With async scheduling a step is launched (and, unconstrained, sampled) before the previous one is
    finished, so at most two are in flight, oldest first. A step with constrained requests stays LAUNCHED
    until its grammar bitmask is filled: that fill starts (`bitmask`) once the previous step's tokens have
    advanced the grammars, and runs in the background while the update and the frontend do their work.
    A pipeline keeps as many steps in flight as it has stages, each of other requests, each launched and
    sampled at once (the last stage returns its tokens).
    """

    scheduler_output: SchedulerOutput
    req_ids: list[str]  # in batch order
    samples: np.ndarray  # [len(req_ids)] bool: the row samples a next token (not a prompt chunk's)
    phase: StepPhase = StepPhase.LAUNCHED
    bitmask: Future | None = None  # the background fill of its grammar rows' masks, once started


class EngineCore:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        started = time.perf_counter()
        config.parallel.check_model(source.hf_config)  # before any rank starts
        num_experts = num_routed_experts(source.hf_config)
        if config.parallel.enable_expert_parallel and num_experts:
            ep = config.parallel.expert_parallel_size
            logger.info("expert parallelism: EP size %d (the %s ranks), %d of the %d experts per rank", ep,
                        "data-parallel cores' tensor-parallel" if config.parallel.spans_cores else "tensor-parallel",
                        num_experts // ep, num_experts)
        # Experts spread over data-parallel cores: every core runs a forward pass whenever any does
        # (EngineCoreProc's lock-step loop), a made-up one when it has nothing scheduled.
        self.lockstep = config.parallel.spans_cores
        self.executor = make_executor(config, source)
        try:
            self._start(config, source)
        except BaseException:
            self.executor.shutdown()
            raise
        logger.info("engine ready in %.1f s", time.perf_counter() - started)
        if self.num_host_blocks:
            logger.info("KV host tier: %d blocks (%.2f GiB)", self.num_host_blocks, config.cache.kv_offload_size)
        self.async_scheduling = self.config.scheduler.async_scheduling
        self.max_concurrent_batches = self.config.scheduler.max_concurrent_batches
        self.structured = StructuredOutputManager(lambda: load_tokenizer(source, config.model.tokenizer),
                                                  source.hf_config.vocab_size)
        self.in_flight: deque[InFlightStep] = deque()
        self.scheduler = Scheduler(self.config.scheduler, KVCacheManager(
            self.num_blocks, self.config.cache.block_size, config.cache.enable_prefix_caching, self.num_host_blocks))
        # Everything made so far (the model, the block pool's objects) lives as long as the engine: moved
        # out of the garbage collector's generations, it is not traversed again by every collection that
        # a step's allocations trigger.
        gc.collect()
        gc.freeze()

    def _start(self, config: EngineConfig, source: ModelSource) -> None:
        """The ranks' start-up: the model on each device, a KV pool as large as the smallest rank allows,
        CUDA graphs and warm-up."""
        self.worker = self.executor.driver  # rank 0's, whose results are the engine's
        self.config = config = config.resolve(source.hf_config, self.worker.device_info())
        self.executor.call("load_model", config)
        block_size, max_model_len = config.cache.block_size, config.scheduler.max_model_len
        num_blocks = min(self.executor.call("determine_num_blocks"))
        if num_blocks * block_size < max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks of {block_size}), "
                f"fewer than one sequence of max_model_len={max_model_len}; raise gpu_memory_utilization or "
                "kv_cache_memory_bytes, or lower max_model_len")
        num_host_blocks = 0
        if config.cache.enable_prefix_caching:
            num_host_blocks = int(config.cache.kv_offload_size * 2**30) // self.worker.kv_bytes_per_block()
        allocating = time.perf_counter()
        self.executor.call("initialize_cache", num_blocks, num_host_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB of %s; max concurrency %.1f at "
                    "max_model_len=%d), allocated in %.1f s", num_blocks, block_size, num_blocks * block_size,
                    num_blocks * self.worker.kv_bytes_per_block() / 2**30, self.worker.kv_cache_dtype(),
                    num_blocks * block_size / max_model_len, max_model_len, time.perf_counter() - allocating)
        self.executor.call("compile_or_warm_up")
        self.num_blocks, self.num_host_blocks = num_blocks, num_host_blocks

    def shutdown(self) -> None:
        self.executor.shutdown()

    def add_request(self, request: EngineCoreRequest) -> None:
        params = request.sampling_params
        num_prompt = len(request.prompt_token_ids)
        room = self.config.scheduler.max_model_len - num_prompt
        max_tokens = max(1, room if params.max_tokens is None else min(params.max_tokens, room))
        core_request = Request(request.request_id, request.prompt_token_ids, params, max_tokens, request.arrival_time)
        if params.structured_outputs is not None:
            core_request.structured = self.structured.request(params.structured_outputs)
        self.scheduler.add_request(core_request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """One step. With async scheduling the next step is scheduled and launched before the previous
        one's tokens are processed, so the host work of one overlaps the device work of the other.

        A grammar's mask depends on the token the step before is still sampling, so a step with
        constrained requests is only launched at first; once the previous tokens are in and have advanced
        the grammars, its masks fill in the background while the update and the frontend run, and the
        next step() samples it and, right behind, launches the following one."""
        if self.max_concurrent_batches > 1:
            return self._pipelined_step()
        if not self.async_scheduling or self.scheduler.needs_sync_scheduling():
            outputs = self._finish_all()
            self._sample(self._launch())
            return outputs + self._finish_all()
        if self.in_flight and self.in_flight[-1].phase is StepPhase.LAUNCHED:
            self._sample(self.in_flight[-1])
        step = self._launch()
        if self.scheduler.num_structured_requests == 0:
            self._sample(step)
        outputs = []
        while len(self.in_flight) > 1:
            outputs += self._finish_oldest()
        self._start_fill()
        if not step.req_ids:
            # Nothing was launched: finish it now (its update still reports the requests the scheduler
            # ended), or an idle engine would always hold a step in flight and step forever.
            outputs += self._finish_all()
        return outputs

    def _pipelined_step(self) -> list[EngineCoreOutput]:
        """A pipeline's step: launches a micro-batch while fewer than one per stage are in flight, then, once
        they all are (or nothing more could run), waits for the oldest's tokens. A request's next step is
        scheduled only once its tokens are in, so its grammar mask is filled at once, and the scheduler sends
        its tokens to the stages with it."""
        outputs = []
        launched = len(self.in_flight) < self.max_concurrent_batches and self.scheduler.has_work_for_a_step()
        if launched:
            step = self._launch()
            if step.req_ids:
                self._sample(step, from_output_rank=True)
            else:  # nothing to run: it only told the runners of finished and preempted requests
                self.executor.step("sample_tokens", None)
                self.in_flight.pop()
                launched = False
                outputs += self.scheduler.update_from_output(step.scheduler_output, ModelRunnerOutput([], [], []))
        if self.in_flight and (len(self.in_flight) == self.max_concurrent_batches or not launched):
            step = self.in_flight.popleft()
            outputs += self._update(step, self.executor.next_output())
        return outputs

    def _launch(self) -> InFlightStep:
        with step_timer.phase("schedule"):
            scheduler_output = self.scheduler.schedule()
        info = self.executor.step("execute_model", scheduler_output)
        if self.lockstep and not info.req_ids:  # nothing scheduled ran, but the other cores' steps need ours
            self.executor.step("execute_dummy")
        step = InFlightStep(scheduler_output, info.req_ids, info.samples)
        self.in_flight.append(step)
        return step

    def _sample(self, step: InFlightStep, from_output_rank: bool = False) -> None:
        """Queues a launched step's sampling, the rows of constrained requests masked by their grammars'
        next-token bitmasks: filled in the background since the previous step's tokens came in (async
        scheduling), else now. `from_output_rank`: a pipeline's, whose last stage returns the step's output."""
        with step_timer.phase("grammar"):
            if step.bitmask is not None:
                bitmask = step.bitmask.result()
            else:
                rows, grammars = self._constrained_rows(step)
                bitmask = self.structured.fill(grammars, rows, len(step.req_ids)) if rows else None
        send = self.executor.step_with_output if from_output_rank else self.executor.step
        send("sample_tokens", bitmask)
        step.phase = StepPhase.SAMPLED

    def _constrained_rows(self, step: InFlightStep) -> tuple[list[int], list]:
        if not self.scheduler.num_structured_requests:
            return [], []
        return grammar.constrained_rows(self.scheduler.requests, step.req_ids, step.samples)

    def _start_fill(self) -> None:
        """Starts filling the masks of the newest step, launched but not sampled, in the background."""
        step = self.in_flight[-1] if self.in_flight else None
        if step is None or step.phase is not StepPhase.LAUNCHED or step.bitmask is not None:
            return
        with step_timer.phase("fill_start"):
            rows, grammars = self._constrained_rows(step)
            if rows:
                step.bitmask = self.structured.start_fill(grammars, rows, len(step.req_ids))

    def _finish_oldest(self) -> list[EngineCoreOutput]:
        """Waits for the oldest step's tokens, advances the grammars by them, starts the next step's mask
        fill (the grammars are now where that step's tokens continue) and updates the requests."""
        step = self.in_flight.popleft()
        return self._update(step, self.executor.step("finish_step"))

    def _update(self, step: InFlightStep, runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        with step_timer.phase("accept"):
            if self.scheduler.num_structured_requests:
                grammars, tokens = grammar.tokens_to_accept(self.scheduler.requests, runner_output)
                if grammars:
                    with step_timer.phase("accept_call"):
                        self.structured.accept(grammars, tokens)
            self._start_fill()
        with step_timer.phase("update"):
            return self.scheduler.update_from_output(step.scheduler_output, runner_output)

    def _finish_all(self) -> list[EngineCoreOutput]:
        """Finishes every step in flight (the switch to sync scheduling), sampling a launched one first."""
        outputs = []
        while self.in_flight:
            if self.in_flight[0].phase is StepPhase.LAUNCHED:
                self._sample(self.in_flight[0])
            outputs += self._finish_oldest()
        return outputs

    def dummy_step(self) -> None:
        """A forward pass of one made-up token (lock-step: another core has work, this one has none)."""
        self.executor.step("execute_dummy")

    def dp_sync(self, has_work: bool, stopping: bool) -> tuple[bool, bool]:
        """(whether any data-parallel core has work, whether any is stopping), agreed by every core."""
        any_work, any_stopping = self.worker.dp_sync([int(has_work), int(stopping)])
        return bool(any_work), bool(any_stopping)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()
