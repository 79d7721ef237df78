"""Random weights for any supported config: benchmarks at real model sizes with no checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.loader.base import WeightLoader


def init_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not getattr(param, "optional", False):  # optional ones (KV-cache scales) keep their defaults
                param.uniform_(low, high, generator=generator)


class DummyLoader(WeightLoader):
    def load(self, model: nn.Module, dtype: torch.dtype, seed: int) -> None:
        init_dummy_weights(model, seed)
