"""Prometheus metrics under vLLM's names, fed by AsyncLLM after every engine step.

Each app gets its own CollectorRegistry, so several servers (or tests) in one process do not clash.
Cumulative core counters (preemptions, prefix-cache queries and hits) arrive as totals in
SchedulerStats and are turned into counter increments here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenmill.core.interface import SchedulerStats
from tokenmill.engine.async_llm import IterationStats

__all__ = ["PrometheusStatLogger", "CONTENT_TYPE_LATEST"]

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


class PrometheusStatLogger:
    def __init__(self, model_name: str, cache_info: dict[str, str] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        if cache_info:
            Gauge("vllm:cache_config_info", "Information of the LLMEngine's cache config.", list(cache_info),
                  registry=self.registry).labels(**cache_info).set(1)
        labels = ["model_name"]

        def make(kind, name: str, doc: str, **kwargs):
            return kind(name, doc, labels, registry=self.registry, **kwargs).labels(model_name)

        self.num_running = make(Gauge, "vllm:num_requests_running", "Number of requests in model execution batches.")
        self.num_waiting = make(Gauge, "vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = make(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = make(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = make(Counter, "vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = make(Counter, "vllm:num_preemptions", "Cumulative number of preemptions.")
        self.prefix_queries = make(Counter, "vllm:prefix_cache_queries",
                                   "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = make(Counter, "vllm:prefix_cache_hits",
                                "Prefix cache hits, in terms of number of cached tokens.")
        self.host_hits = make(Counter, "vllm:external_prefix_cache_hits",
                              "Prefix cache hits copied back from the host KV tier, in tokens.")
        self.spec_drafts = make(Counter, "vllm:spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_draft_tokens = make(Counter, "vllm:spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_accepted = make(Counter, "vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.")
        self.spec_accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                             "Accepted tokens per draft position.", ["model_name", "position"],
                                             registry=self.registry)
        self.model_name = model_name
        self.ttft = make(Histogram, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         buckets=_TTFT_BUCKETS)
        self.tpot = make(Histogram, "vllm:time_per_output_token_seconds",
                         "Histogram of time per output token in seconds.", buckets=_TPOT_BUCKETS)
        self.e2e = make(Histogram, "vllm:e2e_request_latency_seconds",
                        "Histogram of end to end request latency in seconds.", buckets=_E2E_BUCKETS)
        self._last = SchedulerStats()

    def record(self, stats: SchedulerStats, iteration: IterationStats) -> None:
        self.num_running.set(stats.num_running_reqs)
        self.num_waiting.set(stats.num_waiting_reqs)
        self.kv_usage.set(stats.kv_cache_usage)
        for counter, now, before in ((self.preemptions, stats.num_preemptions, self._last.num_preemptions),
                                     (self.prefix_queries, stats.prefix_cache_queries, self._last.prefix_cache_queries),
                                     (self.prefix_hits, stats.prefix_cache_hits, self._last.prefix_cache_hits),
                                     (self.host_hits, stats.prefix_cache_host_hits,
                                      self._last.prefix_cache_host_hits),
                                     (self.spec_drafts, stats.spec_decode_num_drafts,
                                      self._last.spec_decode_num_drafts),
                                     (self.spec_draft_tokens, stats.spec_decode_num_draft_tokens,
                                      self._last.spec_decode_num_draft_tokens),
                                     (self.spec_accepted, stats.spec_decode_num_accepted_tokens,
                                      self._last.spec_decode_num_accepted_tokens)):
            if now > before:
                counter.inc(now - before)
        before_per_pos = self._last.spec_decode_num_accepted_tokens_per_pos
        for position, now in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
            before = before_per_pos[position] if position < len(before_per_pos) else 0
            if now > before:
                self.spec_accepted_per_pos.labels(self.model_name, str(position)).inc(now - before)
        self._last = stats
        if iteration.num_prompt_tokens:
            self.prompt_tokens.inc(iteration.num_prompt_tokens)
        if iteration.num_generation_tokens:
            self.generation_tokens.inc(iteration.num_generation_tokens)
        for value in iteration.time_to_first_tokens:
            self.ttft.observe(value)
        for value in iteration.inter_token_latencies:
            self.tpot.observe(value)
        for value in iteration.e2e_latencies:
            self.e2e.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
