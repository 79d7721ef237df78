"""Weights from a HF-format directory of PyTorch pickles: `pytorch_model.bin`, shards listed in
`pytorch_model.bin.index.json`, or `*.pt` (vLLM's load_format "pt"). Older checkpoints and most published
EAGLE heads ship only these. Each file is memory-mapped and unpickled with `weights_only=True`, so a file can
hold nothing but tensors and plain containers (no code runs), and a page is read only when touched."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from tokenmill.loader.base import CheckpointLoader

INDEX = "pytorch_model.bin.index.json"


def pt_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(model_dir, name) for name in json.load(f)["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.bin")) + glob.glob(os.path.join(model_dir, "*.pt")))
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"shards named in the index are missing: {missing}")
    return files


def pt_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        yield name, tensor


class PtLoader(CheckpointLoader):
    source_formats = ("pt",)

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        files = pt_files(self.source.path)
        for path in tqdm(files, desc="Loading PyTorch checkpoint shards", disable=len(files) == 1 and None):
            yield from pt_tensors(path)
