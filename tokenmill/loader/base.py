"""The weight-loader interface: how one load format fills a model built with empty storage."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from tokenmill.source import ModelSource


class WeightLoader(ABC):
    # The ModelSource formats this loader reads ("safetensors", "gguf"); empty: any.
    source_formats: tuple[str, ...] = ()

    def __init__(self, source: ModelSource, load_format: str) -> None:
        if self.source_formats and source.format not in self.source_formats:
            raise ValueError(f"load_format={load_format!r} cannot read {source.path!r} (a {source.format} model)")
        self.source = source

    @abstractmethod
    def load(self, model: nn.Module, dtype: torch.dtype, seed: int) -> None:
        """Fills every parameter of `model` (built in `dtype`); `seed` for formats that draw values."""


class CheckpointLoader(WeightLoader):
    """A format with files: it yields (HF name, tensor) pairs and the model maps each name to its
    parameter (`load_weights`); a parameter no tensor filled is an error."""

    @abstractmethod
    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in `dtype`) for every tensor of the checkpoint."""

    def load(self, model: nn.Module, dtype: torch.dtype, seed: int) -> None:
        loaded = model.load_weights(self.weights(dtype))
        params = model.named_parameters(remove_duplicate=False)
        missing = sorted(name for name, param in params if name not in loaded and not getattr(param, "optional", False))
        if missing:
            raise ValueError(f"checkpoint {self.source.path!r} lacks weights for {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")
