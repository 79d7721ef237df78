"""Weights from a HF-format directory of PyTorch pickles: `pytorch_model.bin`, shards listed in
`pytorch_model.bin.index.json`, or `*.pt` (vLLM's load_format "pt"). Older checkpoints and most published
EAGLE heads ship only these. Each file is memory-mapped and unpickled with `weights_only=True`, so a file can
hold nothing but tensors and plain containers (no code runs), and a page is read only when touched."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tokenmill.loader.base import ShardedCheckpointLoader


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


class PtLoader(ShardedCheckpointLoader):
    source_formats = ("pt",)
    index_name, patterns, kind = "pytorch_model.bin.index.json", ("*.bin", "*.pt"), "PyTorch checkpoint"
    file_tensors = staticmethod(pt_tensors)
