"""The attention layer: the one engine-specific piece of a model.

From the packed projection qkv [T, (Hq + 2 Hkv) * D] and the tokens' positions it applies the optional
per-head q/k RMSNorm (Qwen3) and the rotary embedding, writes this step's keys and values into its layer
of the paged KV cache, and attends through the backend of the forward context. On the GPU one Triton
kernel (triton_ops.qk_norm_rope_inplace) does the norms, the rotation and the cache write.

A layer built with `sliding_window` attends to the last that many keys only (Mistral, Qwen2's upper layers,
GPT-OSS's alternate layers); the model passes `sinks` (GPT-OSS: one learned logit per query head, which it
owns as a parameter) to each call. All of a request's blocks stay allocated: the backends skip the key
tiles before a window, but nothing frees the blocks behind every layer's window.

The model's last layer is built with `is_last_layer`: when the forward context sets `logits_rows` (only
each request's last row is read after the pass), every key is still written but only those rows attend.

An FP8 cache holds key / k_scale and value / v_scale: the layer's `k_scale` and `v_scale`, from the
checkpoint when it has them (an FP8 checkpoint's kv_cache_scheme), else 1.0, or, with
`calculate_kv_scales` set, from the first forward pass after it is set (vLLM's rule: the largest |key| over
200 and |value| over 100, leaving later tokens headroom). The kernels read them as device tensors, so CUDA
graphs replay with the scales as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.forward_context import ForwardContext, get_forward_context
from tokenmill.layers.layernorm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding

K_SCALE_CONSTANT, V_SCALE_CONSTANT = 200.0, 100.0


def _kv_scale_param() -> nn.Parameter:
    """A KV-cache scale: 1.0 unless the checkpoint has one (so a checkpoint without it still loads)."""
    param = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
    param.optional = True
    param.weight_loader = lambda p, loaded: p.data.copy_(loaded.reshape(()))
    return param


class Attention(nn.Module):
    # Planes of its cache layer: keys and values (MLAAttention: 1, the latent)
    num_kv_planes = 2

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary_emb: RotaryEmbedding,
                 is_last_layer: bool = False, sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.scale = scale
        self.rotary_emb = rotary_emb
        self.is_last_layer = is_last_layer
        # [num_kv_planes, num_blocks, block_size, num_kv_heads, head_dim], bound by the worker's KV cache
        self.kv_cache = torch.empty(0)
        self.k_scale, self.v_scale = _kv_scale_param(), _kv_scale_param()
        self.calculate_kv_scales = False

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, q_norm: RMSNorm | None = None,
                k_norm: RMSNorm | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """positions [T], qkv [T, (Hq + 2 Hkv) * D] -> [T, Hq * D], or [len(logits_rows), Hq * D] in the last
        layer of a pass that reads only the logits rows. q_norm/k_norm: per-head RMSNorms applied to queries
        and keys before the rotation (the model owns their weights); sinks: [Hq] logits or None."""
        ctx = get_forward_context()
        q, k, v = self._rotate_and_cache(positions, qkv, q_norm, k_norm, ctx)
        options = dict(k_scale=self.k_scale, v_scale=self.v_scale, sliding_window=self.sliding_window, sinks=sinks)
        if self.is_last_layer and ctx.logits_rows is not None:
            out = ctx.backend.forward(q[ctx.logits_rows], self.kv_cache, ctx.logits_metadata, self.scale, **options)
        else:
            out = ctx.backend.forward(q, self.kv_cache, ctx.attn_metadata, self.scale, key=k, value=v, **options)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def _rotate_and_cache(self, positions: torch.Tensor, qkv: torch.Tensor, q_norm: RMSNorm | None,
                          k_norm: RMSNorm | None, ctx: ForwardContext
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]), normed and rotated; k and v are in the cache."""
        num_tokens = qkv.shape[0]
        slot_mapping = ctx.attn_metadata.slot_mapping
        fused_write = qkv.is_cuda and not self.calculate_kv_scales
        if qkv.is_cuda:  # one kernel: norms and rotary in place on the projection, keys and values cached
            from tokenmill.layers.triton_ops import qk_norm_rope_inplace

            norms = dict(q_weight=q_norm.weight, k_weight=k_norm.weight, eps=q_norm.eps) if q_norm is not None else {}
            cache = dict(kv_cache=self.kv_cache, slot_mapping=slot_mapping, k_scale=self.k_scale,
                         v_scale=self.v_scale) if fused_write else {}
            qk_norm_rope_inplace(qkv, positions, self.rotary_emb.cos_cache, self.rotary_emb.sin_cache, self.num_heads,
                                 self.num_kv_heads, self.head_dim, **norms, **cache)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not qkv.is_cuda:
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            q, k = self.rotary_emb(positions, q, k, ctx.attn_metadata.derived)
        if self.calculate_kv_scales:
            tiny = torch.finfo(torch.float32).tiny  # an all-zero batch must not make the scale 0
            self.k_scale.copy_((k.abs().amax().float() / K_SCALE_CONSTANT).clamp_min(tiny))
            self.v_scale.copy_((v.abs().amax().float() / V_SCALE_CONSTANT).clamp_min(tiny))
            self.calculate_kv_scales = False
        if not fused_write:
            ctx.backend.write_kv(k, v, self.kv_cache, slot_mapping, self.k_scale, self.v_scale,
                                 ctx.attn_metadata.derived)
        return q, k, v
