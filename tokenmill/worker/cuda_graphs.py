"""CUDA graphs over the model runner's static input buffers, one per padded size, captured largest first
into one memory pool (shared by both kinds):

- decode-only steps, by batch size: the model forward and the LM head; sampling runs after the replay,
  eagerly, on the real rows only;
- small mixed steps (prefill chunks, prefix-cache hits, chunks with decodes), by token count: the model
  forward only; the LM head and sampling run eagerly on each request's last row. Without a graph such
  a step costs more host time to launch (hundreds of kernels) than device time to run.

A step is padded with tokens that belong to no request (slot -1) and requests with no tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

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
