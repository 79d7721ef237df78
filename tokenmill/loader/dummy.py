"""Random weights for any supported config: benchmarks at real model sizes with no checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.loader.base import WeightLoader


def init_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """Floating-point parameters uniform in [low, high); integer ones (packed codes) uniform in their
    `dummy_range` [lo, hi), every code by default."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if getattr(param, "optional", False):  # optional ones (KV-cache scales) keep their defaults
                continue
            if param.is_floating_point():
                param.uniform_(low, high, generator=generator)
            else:
                param.random_(*getattr(param, "dummy_range", (0, 256)), generator=generator)


class DummyLoader(WeightLoader):
    def load(self, model: nn.Module, dtype: torch.dtype, seed: int) -> None:
        init_dummy_weights(model, seed)
