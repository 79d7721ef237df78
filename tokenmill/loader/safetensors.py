"""Weights from a HF-format directory: one `*.safetensors` file or shards listed in an index."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from tokenmill.loader.base import CheckpointLoader


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(model_dir, name) for name in weight_map.values()})
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir!r} (use load_format='dummy' for "
                                "random weights)")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"shards named in the index are missing: {missing}")
    return files


class SafetensorsLoader(CheckpointLoader):
    source_formats = ("safetensors",)

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        files = safetensors_files(self.source.path)
        for path in tqdm(files, desc="Loading safetensors shards", disable=len(files) == 1 and None):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # as stored: FP8 weights stay FP8, scales float32; copies cast the rest
                    yield name, f.get_tensor(name)
