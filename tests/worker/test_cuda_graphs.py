"""Which sizes the CUDA graphs are captured at and how a step is padded to one (the capture itself needs a
GPU: tests/gpu)."""

from __future__ import annotations

from tokenmill.worker.cuda_graphs import CudaGraphs, capture_sizes, mixed_capture_sizes, mixed_num_reqs


def test_capture_sizes():
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1024)[-1] == 512
    assert mixed_capture_sizes(16384) == [16, 32, 64, 128, 256, 512]
    assert mixed_capture_sizes(100) == [16, 32, 64]
    assert mixed_num_reqs(512, 256) == 256 and mixed_num_reqs(16, 256) == 16


def test_padded_size_is_the_smallest_captured_size_that_holds_the_step():
    graphs = CudaGraphs("decode", [1, 2, 4, 8])
    assert graphs.padded_size(3) is None  # nothing captured yet
    graphs.graphs = {size: None for size in (1, 2, 4, 8)}
    assert [graphs.padded_size(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert graphs.max_size == 8 and CudaGraphs("mixed", []).max_size == 0
