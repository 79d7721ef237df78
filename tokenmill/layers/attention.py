"""The attention layer: the one engine-specific piece of a model. It writes this step's keys and
values into its layer of the paged KV cache, then attends through the backend of the forward context."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # [2, num_blocks, block_size, num_kv_heads, head_dim], bound by the model runner
        self.kv_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logits_only: bool = False,
                kv_written: bool = False) -> torch.Tensor:
        """q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim]. With
        `logits_only` (the context's logits_rows set), every key is written but only the logits rows attend:
        -> [len(logits_rows), num_heads * head_dim]. `kv_written`: the caller already stored k and v in
        this layer's cache at the step's slots (a fused kernel), so they are not written again."""
        ctx = get_forward_context()
        if not kv_written:
            ctx.backend.write_kv(k, v, self.kv_cache, ctx.attn_metadata.slot_mapping)
        if logits_only:
            q = q[ctx.logits_rows]
            out = ctx.backend.forward(q, self.kv_cache, ctx.logits_metadata, self.scale)
        else:
            out = ctx.backend.forward(q, self.kv_cache, ctx.attn_metadata, self.scale, key=k, value=v)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
