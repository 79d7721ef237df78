"""Weights from a HF-format directory: one `*.safetensors` file or shards listed in an index."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator

import torch

from tokenmill.loader.base import ShardedCheckpointLoader

# safetensors' dtype names
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def mapped_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one .safetensors file as views of a copy-on-write memory map, as stored (FP8 weights stay
    FP8, scales float32). A page is read only when touched, so a rank that copies out its shard of a tensor
    reads about that shard; the map lives as long as any view of it."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(f.fileno()).st_size > 0 else None
    base = 8 + header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which tokenmill does not load")
        dtype, (start, end) = DTYPES[entry["dtype"]], entry["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start) if count \
            else torch.empty(0, dtype=dtype)
        yield name, flat.view(entry["shape"])


class SafetensorsLoader(ShardedCheckpointLoader):
    source_formats = ("safetensors",)
    index_name, patterns, kind = "model.safetensors.index.json", ("*.safetensors",), "safetensors"
    file_tensors = staticmethod(mapped_tensors)
