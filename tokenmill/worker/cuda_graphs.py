"""CUDA graphs for decode-only steps: one graph per padded batch size, captured largest first into one
memory pool. A graph covers the model forward and the LM head over static input buffers; sampling
runs after it, eagerly, on the real rows only.
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


class DecodeGraphs:
    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    @property
    def max_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def padded_size(self, num_reqs: int) -> int | None:
        for size in self.sizes:
            if size >= num_reqs:
                return size
        return None

    def capture(self, run: Callable[[int], torch.Tensor]) -> float:
        """`run(size)` does one forward over the first `size` rows of the static buffers; returns seconds."""
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
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1f s, %.0f MiB", len(self.sizes),
                    self.sizes[0], self.max_size, seconds, used / 2**20)
        return seconds

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]
