"""The 4-bit kernels a weight format's layers run through: PyTorch's packed CPU kernel (int4_cpu.py) on the CPU,
our Triton W4A16 GEMM (int4_gpu.py) on a GPU. A format hands over q (0..15), scale and zero per group with
w = (q - 8) * scale + zero; `pack` returns the weight in the kernel's layout and the kernel, or None where
neither takes the shape (the format then dequantizes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokenmill.layers.quantization import int4_cpu

Kernel = Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]


def backend_for(device_type: str) -> str:
    return "cpu" if device_type == "cpu" else "triton"


# the CPU kernel's, which the GPU's takes too; the larger first: the fewer scales to read
GROUP_SIZES = tuple(sorted(int4_cpu.GROUP_SIZES, reverse=True))


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype
         ) -> tuple[Any, Kernel] | None:
    """q [N, K], scale and zero [N, K / group_size], on the device the layer runs on."""
    if backend_for(q.device.type) == "cpu":
        if group_size not in int4_cpu.GROUP_SIZES:
            return None
        return int4_cpu.pack_int4(q, scale, zero, group_size), int4_cpu.int4_linear
    from tokenmill.layers.quantization import int4_gpu  # Triton: imported where a GPU runs it

    if not int4_gpu.supports(q.shape[1], group_size):
        return None
    return int4_gpu.pack_int4_gpu(q, scale, zero, group_size, dtype), int4_gpu.int4_gemm
