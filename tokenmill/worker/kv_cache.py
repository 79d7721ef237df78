"""One worker's paged KV cache: the device pool, its binding to the attention layers, and the host tier.

    device pool  [num_layers, planes, num_blocks, block_size, num_kv_heads, head_dim]   layer i's view goes to
                 its Attention layer (attention/backend.py describes the per-layer layout)
    host tier    [num_host_blocks, num_layers, planes, block_size, num_kv_heads, head_dim], pinned, so a
                 block (all layers) is one contiguous range that one asynchronous copy moves

planes: 2 (keys, values), or 1 for MLA's latent cache (one 'head' of kv_lora_rank + qk_rope_head_dim per
token, whose values are the keys' first kv_lora_rank channels): a block then holds a token in
(kv_lora_rank + rope) values instead of 2 x num_kv_heads x head_dim, and the scheduler's block count,
which comes from bytes_per_block, grows by that ratio.

Block ids are the scheduler's (core/block_pool.py); this file only moves bytes.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from tokenmill.layers.attention import Attention
from tokenmill.layers.fp8_format import FP8_DTYPE


class KVCache:
    def __init__(self, attn_layers: list[Attention], block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.attn_layers = attn_layers
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        layer = attn_layers[0]
        self.num_planes = layer.num_kv_planes
        if self.num_planes == 1 and dtype == FP8_DTYPE:
            raise ValueError("kv_cache_dtype='fp8' is not supported with MLA (DeepSeek-V2/V3) models; use "
                             "kv_cache_dtype='auto'")
        self.block_shape = (block_size, layer.num_kv_heads, layer.head_dim)
        self.pool: torch.Tensor | None = None
        self.host_pool: torch.Tensor | None = None
        self.offload_stream: torch.cuda.Stream | None = None
        self.offloads: list[tuple[torch.cuda.Event, set[int]]] = []  # copies out in flight: (done, host ids)

    def bytes_per_block(self) -> int:
        """One block of every layer, keys and values (or the latent)."""
        return self.num_planes * math.prod(self.block_shape) * self.dtype.itemsize * len(self.attn_layers)

    def allocate(self, num_blocks: int) -> None:
        """The pool, zeroed: padded key slots must hold finite numbers, since masked scores times NaN are NaN.
        On the CPU its pages are the operating system's zero pages until written (calloc), so a large pool
        costs neither start-up time nor memory before it is used."""
        shape = (len(self.attn_layers), self.num_planes, num_blocks, *self.block_shape)
        if self.device.type == "cpu":
            num_bytes = math.prod(shape) * self.dtype.itemsize
            self.pool = torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(self.dtype).view(shape)
        else:
            self.pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for attn, layer_cache in zip(self.attn_layers, self.pool.unbind(0)):
            attn.kv_cache = layer_cache

    @contextlib.contextmanager
    def scratch(self, num_blocks: int):
        """A temporary pool of num_blocks shared by every layer (memory profiling), unbound afterwards."""
        scratch = torch.zeros(self.num_planes, num_blocks, *self.block_shape, dtype=self.dtype, device=self.device)
        for attn in self.attn_layers:
            attn.kv_cache = scratch
        try:
            yield
        finally:
            for attn in self.attn_layers:
                attn.kv_cache = torch.empty(0)

    def allocate_host_tier(self, num_blocks: int) -> None:
        cuda = self.device.type == "cuda"
        self.host_pool = torch.zeros((num_blocks, len(self.attn_layers), self.num_planes, *self.block_shape),
                                     dtype=self.dtype, pin_memory=cuda)
        self.offload_stream = torch.cuda.Stream(self.device) if cuda else None

    @torch.inference_mode()
    def copy_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Evicted device blocks to the host tier, then host-tier hits back to the device, without waiting.

        Out: the blocks are gathered on the compute stream, ahead of the forward pass that may overwrite
        them, into a staging buffer that a side stream copies to the host while compute goes on. In: a
        copy that reads a host block still being written by such a copy waits for it, then the blocks are
        scattered on the compute stream. Runs of consecutive host blocks move in one copy each (pinned)."""
        cuda = self.device.type == "cuda"
        if cuda:
            self.offloads = [(event, ids) for event, ids in self.offloads if not event.query()]
        if swap_out:
            device_ids, host_ids = zip(*swap_out)
            index = torch.tensor(device_ids).to(self.device, non_blocking=True)
            staged = self.pool[:, :, index].permute(2, 0, 1, 3, 4, 5).contiguous()
            with torch.cuda.stream(self.offload_stream) if cuda else contextlib.nullcontext():
                if cuda:
                    self.offload_stream.wait_stream(torch.cuda.current_stream())
                    staged.record_stream(self.offload_stream)
                for start, host_start, length in runs(host_ids):
                    self.host_pool[host_start:host_start + length].copy_(staged[start:start + length],
                                                                         non_blocking=True)
            if cuda:
                self.offloads.append((self.offload_stream.record_event(), set(host_ids)))
        if swap_in:
            host_ids, device_ids = zip(*swap_in)
            wanted = set(host_ids)
            for event, ids in self.offloads:
                if ids & wanted:
                    torch.cuda.current_stream().wait_event(event)
            staged = torch.empty((len(host_ids), *self.host_pool.shape[1:]), dtype=self.dtype, device=self.device)
            for start, host_start, length in runs(host_ids):
                staged[start:start + length].copy_(self.host_pool[host_start:host_start + length], non_blocking=True)
            index = torch.tensor(device_ids).to(self.device, non_blocking=True)
            self.pool[:, :, index] = staged.permute(1, 2, 0, 3, 4, 5)


def runs(ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(position, first id, length) of each run of consecutive ids: [5, 6, 7, 2] -> [(0, 5, 3), (3, 2, 1)]."""
    found: list[tuple[int, int, int]] = []
    for position, block_id in enumerate(ids):
        if found and found[-1][1] + found[-1][2] == block_id:
            found[-1] = (found[-1][0], found[-1][1], found[-1][2] + 1)
        else:
            found.append((position, block_id, 1))
    return found
