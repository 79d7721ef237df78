"""CUDA graphs over the model runner's static input buffers, one per padded size, captured largest first
into one memory pool (shared by both kinds):

- decode-only steps, by batch size: the model forward and the LM head; sampling runs after the replay,
  eagerly, on the real rows only;
- small mixed steps (prefill chunks, prefix-cache hits, chunks with decodes), by token count: the model
  forward only; the LM head and sampling run eagerly on each request's last row. Without a graph such
  a step costs more host time to launch (hundreds of kernels) than device time to run. With an EAGLE head
  (or MTP) they also return what the head reads (spec_decode/eagle.py's features), and the head's target
  runs every step, decode-only ones too, in them: the decode graphs return logits only.

A step is padded with tokens that belong to no request (slot -1) and requests with no tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tokenmill.forward_context import set_forward_context
from tokenmill.spec_decode.eagle import EagleProposer

if TYPE_CHECKING:
    from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, max_size: int = 512) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to min(max_num_seqs, max_size)."""
    limit = min(max_num_seqs, max_size)
    sizes = [s for s in (1, 2, 4) if s <= limit] + list(range(8, limit + 1, 8))
    if limit not in sizes:
        sizes.append(limit)
    return sorted(set(sizes))


def mixed_capture_sizes(max_num_batched_tokens: int, max_size: int = 512) -> list[int]:
    """Token counts 16, 32, ... doubling up to min(max_num_batched_tokens, max_size)."""
    return [s for s in (16, 32, 64, 128, 256, 512) if s <= min(max_num_batched_tokens, max_size)]


def mixed_num_reqs(num_tokens: int, max_num_reqs: int) -> int:
    """Request rows of a mixed-step graph of num_tokens tokens: every request has at least one."""
    return min(num_tokens, max_num_reqs)


class CudaGraphs:
    def __init__(self, kind: str, sizes: list[int]) -> None:
        self.kind = kind
        self.sizes = sizes
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    @property
    def max_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def padded_size(self, n: int) -> int | None:
        """The smallest captured size holding n, if any."""
        for size in self.sizes:
            if size >= n and size in self.graphs:
                return size
        return None

    def capture(self, run: Callable[[int], torch.Tensor], pool=None) -> float:
        """`run(size)` does one forward over the first `size` rows of the static buffers; returns seconds.
        `pool`: another set's memory pool to share (its graphs never run at the same time)."""
        self.pool = pool
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        for size in reversed(self.sizes):
            run(size)  # warm-up outside the graph: kernels compiled, workspaces allocated
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = run(size)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        used = free_before - torch.cuda.mem_get_info()[0]
        logger.info("captured %d %s CUDA graphs (sizes %d..%d) in %.1f s, %.0f MiB", len(self.sizes), self.kind,
                    self.sizes[0], self.max_size, seconds, used / 2**20)
        return seconds

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]


@torch.inference_mode()
def capture_model_graphs(runner: ModelRunner) -> float:
    """Captures the runner's decode and mixed-step graphs over its static input buffers (needs the KV
    cache); returns seconds taken. The buffers hold the padding layout while capturing."""
    graphs, mixed = runner.graphs, runner.mixed_graphs
    if not graphs.sizes and not mixed.sizes:
        return 0.0
    inputs = runner.inputs
    inputs.reset_for_capture(max(graphs.max_size, mixed.max_size), runner.max_num_reqs)

    def forward(num_tokens: int, num_reqs: int, max_query_len: int) -> torch.Tensor:
        metadata = inputs.capture_metadata(num_tokens, num_reqs, max_query_len, runner.max_model_len)
        with set_forward_context(metadata, runner.backend, graphed=True):
            return runner.model(inputs.input_ids.gpu[:num_tokens], inputs.positions.gpu[:num_tokens])

    seconds = 0.0
    if graphs.sizes:
        seconds += graphs.capture(lambda n: runner.model.compute_logits(forward(n, n, 1)))
    if mixed.sizes:
        def mixed_forward(n: int):
            hidden_states = forward(n, mixed_num_reqs(n, runner.max_num_reqs), n)
            if isinstance(runner.proposer, EagleProposer):  # its head reads these too
                return hidden_states, runner.proposer.features(hidden_states)
            return hidden_states

        seconds += mixed.capture(mixed_forward, pool=graphs.pool)
    return seconds
