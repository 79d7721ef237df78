"""EngineCore: the step loop, schedule -> execute -> update. It sees token ids, never text."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable

from tokenmill.config import EngineConfig
from tokenmill.core.interface import EngineCoreOutput, EngineCoreRequest, SchedulerStats
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.loader import ModelSource, load_tokenizer
from tokenmill.metrics import step_timer
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.worker.memory import determine_num_blocks
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Decode graphs keep their activations (and the [batch, vocab] logits) in a private pool, taken after
# the KV cache is sized.
GRAPH_MEMORY_RESERVE = 512 << 20


def resolve_max_model_len(hf_config, requested: int | None) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if requested is None:
        if limit is None:
            raise ValueError("the model config has no max_position_embeddings; pass max_model_len")
        return int(limit)
    if limit is not None and requested > limit:
        raise ValueError(f"max_model_len={requested} is larger than the model's max_position_embeddings={limit}")
    return requested


class EngineCore:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        config.scheduler.max_model_len = resolve_max_model_len(source.hf_config, config.model.max_model_len)
        config.scheduler.resolve_max_num_batched_tokens(config.resolve_device())
        started = time.perf_counter()
        self.runner = ModelRunner(config, source)
        block_size = config.cache.block_size
        self.runner.tune_gemms()
        graph_reserve = GRAPH_MEMORY_RESERVE if self.runner.graphs.sizes else 0
        num_blocks = determine_num_blocks(self.runner, config.cache, graph_reserve)
        max_model_len = config.scheduler.max_model_len
        if num_blocks * block_size < max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks of {block_size}), "
                f"fewer than one sequence of max_model_len={max_model_len}; raise gpu_memory_utilization or "
                "kv_cache_memory_bytes, or lower max_model_len")
        self.runner.initialize_kv_cache(num_blocks)
        self.runner.capture_cuda_graphs()
        if self.runner.device.type == "cuda":  # compiles what the graphs did not, before the first request
            logger.info("warm-up steps: %.1f s", self.runner.warm_up())
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens (%d tokens), max concurrency %.1f at max_model_len=%d; "
                    "engine ready in %.1f s", num_blocks, block_size, num_blocks * block_size,
                    num_blocks * block_size / max_model_len, max_model_len, time.perf_counter() - started)
        self.async_scheduling = config.scheduler.async_scheduling
        self.structured = StructuredOutputManager(lambda: load_tokenizer(source, config.model.tokenizer),
                                                  source.hf_config.vocab_size)
        # Steps in flight, as (SchedulerOutput, PendingStep): `pending` is sampled, its tokens not yet
        # processed; `unsampled` (constrained requests, async) has its forward pass queued, its sampling not.
        self.pending: tuple | None = None
        self.unsampled: tuple | None = None
        self.filling: tuple | None = None  # (PendingStep, Future of its grammar bitmask, or None if unconstrained)
        num_host_blocks = int(config.cache.kv_offload_size * 2**30) // self.runner.kv_bytes_per_block()
        if num_host_blocks and config.cache.enable_prefix_caching:
            self.runner.initialize_host_cache(num_host_blocks)
            logger.info("KV host tier: %d blocks (%.2f GiB)", num_host_blocks, config.cache.kv_offload_size)
        self.scheduler = Scheduler(config.scheduler, KVCacheManager(
            num_blocks, block_size, config.cache.enable_prefix_caching, num_host_blocks))
        # Everything made so far (the model, the block pool's objects) lives as long as the engine: moved
        # out of the garbage collector's generations, it is not traversed again by every collection that
        # a step's allocations trigger.
        gc.collect()
        gc.freeze()

    def add_request(self, request: EngineCoreRequest) -> None:
        params = request.sampling_params
        num_prompt = len(request.prompt_token_ids)
        room = self.config.scheduler.max_model_len - num_prompt
        max_tokens = max(1, room if params.max_tokens is None else min(params.max_tokens, room))
        core_request = Request(request.request_id, request.prompt_token_ids, params, max_tokens, request.arrival_time)
        if params.structured_outputs is not None:
            core_request.structured = self.structured.request(params.structured_outputs)
        self.scheduler.add_request(core_request)

    def _sample(self, launched) -> None:
        """Queues a launched step's sampling, the rows of constrained requests masked by their grammars'
        next-token bitmasks: filled in the background since the previous step's tokens came in (async
        scheduling), else now."""
        with step_timer.phase("grammar"):
            if self.filling is not None and self.filling[0] is launched:
                bitmask = self.filling[1].result() if self.filling[1] is not None else None
            else:
                rows, grammars = self.scheduler.structured_rows(launched.req_ids, launched.done)
                bitmask = self.structured.fill(grammars, rows, len(launched.req_ids)) if rows else None
            self.filling = None
        self.runner.sample(launched, bitmask)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.pending is not None or self.unsampled is not None

    def step(self) -> list[EngineCoreOutput]:
        """One step. With async scheduling the next step is scheduled and launched before the previous
        one's tokens are processed, so the host work of one overlaps the device work of the other.

        A grammar's mask depends on the token the step before is still sampling, so with constrained
        requests only the forward pass is launched at first; once the previous tokens are in and have
        advanced the grammars, the masks fill in the background while the update and the frontend run,
        and the next step() queues the masked sampling and, right behind it, the following forward pass."""
        if not self.async_scheduling or self.scheduler.needs_sync_scheduling():
            outputs = self._flush()
            with step_timer.phase("schedule"):
                scheduler_output = self.scheduler.schedule()
            launched = self.runner.launch_step(scheduler_output, sample=False)
            self._sample(launched)
            self.pending = (scheduler_output, launched)
            return outputs + self._finish_pending()
        self._sample_unsampled()
        with step_timer.phase("schedule"):
            scheduler_output = self.scheduler.schedule()
        launched = self.runner.launch_step(scheduler_output, sample=self.scheduler.num_structured_requests == 0)
        if launched.logits is not None:
            self.unsampled = (scheduler_output, launched)
        outputs = self._finish_pending()
        if launched.logits is None:
            self.pending = (scheduler_output, launched)
            if not launched.req_ids:
                # Nothing was launched: finish it now (its update still reports the requests the scheduler
                # ended), or an idle engine would always hold a pending step and step forever.
                outputs += self._finish_pending()
        return outputs

    def _flush(self) -> list[EngineCoreOutput]:
        """Finishes the steps in flight (the switch to sync scheduling)."""
        outputs = self._finish_pending()
        if self._sample_unsampled():
            outputs += self._finish_pending()
        return outputs

    def _sample_unsampled(self) -> bool:
        """Queues the sampling of the step whose forward pass alone was launched; it becomes the pending one."""
        if self.unsampled is None:
            return False
        self._sample(self.unsampled[1])
        self.pending, self.unsampled = self.unsampled, None
        return True

    def _finish_pending(self) -> list[EngineCoreOutput]:
        """Waits for the pending step's tokens, advances the grammars by them and updates the requests.
        With a step launched but not sampled (async scheduling, constrained requests), its masks start
        filling in the background as soon as the grammars have advanced, beside the update and the frontend."""
        if self.pending is None:
            if self.unsampled is not None and self.filling is None:  # the first step launched
                self._start_fill()
            return []
        scheduler_output, launched = self.pending
        self.pending = None
        runner_output = self.runner.finish_step(launched)
        with step_timer.phase("accept"):
            requests, tokens = self.scheduler.grammar_tokens(runner_output)
            if requests:
                with step_timer.phase("accept_call"):
                    self.structured.accept([r.structured for r in requests], tokens)
            if self.unsampled is not None:
                with step_timer.phase("fill_start"):
                    self._start_fill()
        with step_timer.phase("update"):
            return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _start_fill(self) -> None:
        launched = self.unsampled[1]
        rows, grammars = self.scheduler.structured_rows(launched.req_ids, launched.done)
        job = self.structured.start_fill(grammars, rows, len(launched.req_ids)) if rows else None
        self.filling = (launched, job)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()
