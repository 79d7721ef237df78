"""Tensor-parallel group state. One process for now: rank 0 of a world of 1, collectives are no-ops.

Layers ask these functions, never torch.distributed directly, so adding tensor parallelism means
initializing a process group here and nothing in the model code changes.
"""

from __future__ import annotations

import torch


def get_tp_rank() -> int:
    return 0


def get_tp_size() -> int:
    return 1


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x
