"""The weight-loader interface: how one load format fills a model built with empty storage."""

from __future__ import annotations

import glob
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

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


class ShardedCheckpointLoader(CheckpointLoader):
    """Files of one kind in a HF directory: the shards an index's weight_map names, else every file matching
    `patterns`; `file_tensors(path)` reads one file's (name, tensor) pairs."""

    index_name: str
    patterns: tuple[str, ...]
    kind: str  # for messages and the progress bar

    @staticmethod
    @abstractmethod
    def file_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
        """One file's tensors, as stored."""

    def files(self) -> list[str]:
        model_dir = self.source.path
        index = os.path.join(model_dir, self.index_name)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted({os.path.join(model_dir, name) for name in json.load(f)["weight_map"].values()})
        else:
            files = sorted(path for pattern in self.patterns for path in glob.glob(os.path.join(model_dir, pattern)))
        if not files:
            raise FileNotFoundError(f"no {self.kind} weights in {model_dir!r} (use load_format='dummy' for "
                                    "random weights)")
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"shards named in the index are missing: {missing}")
        return files

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        files = self.files()
        for path in tqdm(files, desc=f"Loading {self.kind} shards", disable=len(files) == 1 and None):
            yield from self.file_tensors(path)
