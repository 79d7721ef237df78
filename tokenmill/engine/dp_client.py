"""Data parallelism: `data_parallel_size` engine cores behind one frontend, with the interface of one.

    AsyncLLM -> DPCoreClient -+-> EngineCoreClient -> core process (DP rank 0: GPUs 0 .. world_size - 1)
                              +-> EngineCoreClient -> core process (DP rank 1: the next world_size GPUs)
                              ...

Each core is a whole engine (its own scheduler, KV pool, and tensor/pipeline-parallel ranks); with expert
parallelism the cores' ranks also share the MoE layers' experts, and the cores step together
(distributed/parallel_state.py, EngineCoreProc._run_lockstep). A new request
goes to the core with the fewest requests in flight, then the lowest KV-cache usage (its last step's); an
abort goes to the core that holds the request. Every core's outputs reach the frontend as they come; the
scheduler stats it sees, and a utility call's answer, are the cores' combined.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from tokenmill.config import EngineConfig
from tokenmill.core.interface import EngineCoreRequest, SchedulerStats
from tokenmill.distributed.net import free_port
from tokenmill.engine.core_client import CoreMessage, CoreOutputs, CoreReady, EngineCoreClient, UtilityResult


def combined_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Counts summed (per-position counts position by position), KV usage averaged (the cores' pools are the
    same size)."""
    def combined(values: list) -> object:
        return tuple(map(sum, zip(*values))) if isinstance(values[0], tuple) else sum(values)

    fields = dataclasses.fields(SchedulerStats)
    total = SchedulerStats(**{f.name: combined([getattr(s, f.name) for s in stats]) for f in fields})
    total.kv_cache_usage = sum(s.kv_cache_usage for s in stats) / len(stats)
    return total


class DPCoreClient:
    def __init__(self, config: EngineConfig) -> None:
        size = config.parallel.data_parallel_size
        port = free_port() if config.parallel.spans_cores else 0  # where the cores' ranks meet
        self.clients: list[EngineCoreClient] = []
        try:
            for dp_rank in range(size):
                parallel = dataclasses.replace(config.parallel, data_parallel_rank=dp_rank,
                                               data_parallel_master_port=port)
                self.clients.append(EngineCoreClient(dataclasses.replace(config, parallel=parallel)))
        except BaseException:
            self.shutdown()
            raise
        self._lock = threading.Lock()
        self._owner: dict[str, int] = {}  # core request id -> its core
        self.in_flight = [0] * size
        self._stats = [SchedulerStats() for _ in range(size)]
        self._utility_results: dict[int, list[UtilityResult]] = {}

    @property
    def pid(self) -> int:
        return self.clients[0].pid

    def wait_ready(self, timeout_s: float | None = None) -> CoreReady:
        return [client.wait_ready(timeout_s) for client in self.clients][0]

    def start_reader(self, on_message: Callable[[CoreMessage], None]) -> None:
        for index, client in enumerate(self.clients):
            client.start_reader(lambda message, index=index: self._on_message(index, message, on_message))

    def _on_message(self, index: int, message: CoreMessage, on_message: Callable[[CoreMessage], None]) -> None:
        """In core `index`'s reader thread."""
        with self._lock:
            if isinstance(message, CoreOutputs):
                for output in message.outputs:
                    if output.finished and self._owner.pop(output.request_id, None) is not None:
                        self.in_flight[index] -= 1
                self._stats[index] = message.stats
                message = CoreOutputs(message.outputs, combined_stats(self._stats))
            elif isinstance(message, UtilityResult):
                results = self._utility_results.setdefault(message.call_id, [])
                results.append(message)
                if len(results) < len(self.clients):
                    return
                message = self._combine(self._utility_results.pop(message.call_id))
        on_message(message)

    @staticmethod
    def _combine(results: list[UtilityResult]) -> UtilityResult:
        error = next((r.error for r in results if r.error is not None), None)
        if error is not None:
            return UtilityResult(results[0].call_id, error=error)
        values = [r.result for r in results]
        if all(isinstance(v, SchedulerStats) for v in values):
            return UtilityResult(results[0].call_id, combined_stats(values))
        return UtilityResult(results[0].call_id, all(values) if all(isinstance(v, bool) for v in values) else values)

    def add_request(self, request: EngineCoreRequest) -> None:
        with self._lock:
            index = min(range(len(self.clients)), key=lambda i: (self.in_flight[i], self._stats[i].kv_cache_usage))
            self._owner[request.request_id] = index
            self.in_flight[index] += 1
        self.clients[index].add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        by_core: dict[int, list[str]] = {}
        with self._lock:
            for request_id in request_ids:
                index = self._owner.pop(request_id, None)
                if index is not None:
                    self.in_flight[index] -= 1
                    by_core.setdefault(index, []).append(request_id)
        for index, ids in by_core.items():
            self.clients[index].abort_requests(ids)

    def call_utility(self, call_id: int, method: str) -> None:
        for client in self.clients:
            client.call_utility(call_id, method)

    def shutdown(self) -> None:
        for client in self.clients:
            client.shutdown()


def make_core_client(config: EngineConfig) -> EngineCoreClient | DPCoreClient:
    """One core, or data_parallel_size of them behind one client."""
    return DPCoreClient(config) if config.parallel.data_parallel_size > 1 else EngineCoreClient(config)
