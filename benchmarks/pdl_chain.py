"""What does programmatic dependent launch (PDL) save per kernel boundary inside a CUDA graph? A chain of
small dependent Triton kernels (each adds one to a buffer and writes the next) is captured and replayed,
launched plainly and with PDL (each kernel waits on its predecessor with griddepcontrol.wait); a second
chain puts a cuBLAS GEMM between the Triton kernels, as a transformer layer does.

Usage (device machine, repo root): python3 benchmarks/pdl_chain.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tokenmill.layers.cublaslt import graph_time


@triton.jit
def _add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(y_ptr + offsets, x + 1, mask=offsets < n)


def chain(bufs, length: int, pdl: bool, gemm=None) -> None:
    n = bufs[0].numel()
    block = 1024
    for i in range(length):
        x, y = bufs[i % 2], bufs[(i + 1) % 2]
        _add_one[(triton.cdiv(n, block),)](x, y, n, BLOCK=block, PDL=pdl, launch_pdl=pdl)
        if gemm is not None:
            torch.mm(gemm[0], gemm[1], out=gemm[2])


def time_graph(fn) -> float:
    """Microseconds per replay of fn captured in a CUDA graph."""
    return graph_time(fn, reps=50) * 1e6


def main() -> None:
    length = 300
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    print(f"{length} kernels per graph; us per kernel boundary (replay time / {length})")
    for numel in (4096, 1 << 20):
        bufs = [torch.zeros(numel, device="cuda", dtype=torch.float32) for _ in range(2)]
        plain = time_graph(lambda: chain(bufs, length, False))
        pdl = time_graph(lambda: chain(bufs, length, True))
        chained = bufs[length % 2][0].item()
        print(f"add_one x{numel:>8}: plain {plain / length:6.2f} us, PDL {pdl / length:6.2f} us "
              f"(saves {(plain - pdl) / length:5.2f} us per kernel; value check {chained:.0f})")
    a = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(64, 1024, device="cuda", dtype=torch.bfloat16)
    bufs = [torch.zeros(4096, device="cuda", dtype=torch.float32) for _ in range(2)]
    plain = time_graph(lambda: chain(bufs, length // 2, False, (a, b, c)))
    pdl = time_graph(lambda: chain(bufs, length // 2, True, (a, b, c)))
    print(f"add_one + GEMM pairs: plain {plain / length:6.2f} us, PDL {pdl / length:6.2f} us per kernel")


if __name__ == "__main__":
    main()
