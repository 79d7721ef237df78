"""Persistent input buffers: a pinned host tensor (filled through its numpy view) and its device twin.

Every step writes its inputs into the host side with numpy and copies the used prefix to the device
without blocking. The device tensors never move, so CUDA graphs captured over them stay valid.
"""

from __future__ import annotations

import numpy as np
import torch


class StagedBuffer:
    def __init__(self, shape: int | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.cpu = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.np: np.ndarray = self.cpu.numpy()
        self.gpu = torch.zeros(shape, dtype=dtype, device=device) if device.type != "cpu" else self.cpu

    def to_device(self, n: int) -> torch.Tensor:
        """Copies the first n rows to the device (asynchronously from pinned memory); returns them."""
        if self.gpu is not self.cpu:
            self.gpu[:n].copy_(self.cpu[:n], non_blocking=True)
        return self.gpu[:n]
