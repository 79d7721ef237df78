"""Multi-head latent attention (DeepSeek-V2/V3): the attention layer of an MLA model, over a latent cache.

A token's keys and values come from one compressed latent c [L] (L = kv_lora_rank, normed) and one rope key
k_pe [R] shared by every head; kv_b_proj expands c per head into k_nope [N] and v [V]:

    kv_b_proj.weight [H * (N + V), L]  ->  per head  W_UK [N, L] (rows of k_nope), W_UV [V, L] (rows of v)
    score_h(t, s) = q_nope_h(t) . W_UK_h c(s) + q_pe_h(t) . k_pe(s)
                  = (W_UK_h^T q_nope_h(t)) . c(s) + q_pe_h(t) . k_pe(s)
    out_h(t)      = sum_s p_h(t, s) W_UV_h c(s) = W_UV_h (sum_s p_h(t, s) c(s))

So the cache holds only [c | k_pe] per token (L + R values, one "head", attention/backend.py's one-plane
layout), and every step, prefill and decode alike, takes the absorbed path: q_nope goes through W_UK into
the latent space, attention is MQA over the cache with keys [c | k_pe] (head dim L + R) and values c (L),
and the output goes through W_UV. One path for every step keeps chunked prefill, prefix hits and
preemption the same as decode; a prefill then costs more FLOPs than expanding per-head K/V would (L + R
against N + R per score), which matters on a GPU only for long prompts.

The rope dims use the model's rotary (DeepSeek's interleaved pairs, YaRN's attention factor in cos/sin);
the softmax scale is the caller's (qk_head_dim ** -0.5, times YaRN's mscale squared where configured).
The layer owns no weights of its own: W_UK and W_UV are views of the caller's kv_b_proj, so tensor
parallelism (heads split over ranks, the latent replicated) needs nothing here.
"""

from __future__ import annotations

import torch

from tokenmill.forward_context import get_forward_context
from tokenmill.layers.attention import Attention
from tokenmill.layers.rotary import RotaryEmbedding


class MLAAttention(Attention):
    """forward(positions, q [T, H, N + R], latent [T, L], k_pe [T, R], kv_b_weight [H * (N + V), L])
    -> [T, H * V]. Its cache layer is [1, num_blocks, block_size, 1, L + R]."""

    num_kv_planes = 1

    def __init__(self, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, scale: float, rotary_emb: RotaryEmbedding, is_last_layer: bool = False) -> None:
        super().__init__(num_heads, 1, kv_lora_rank + qk_rope_head_dim, scale, rotary_emb, is_last_layer)
        self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim = kv_lora_rank, qk_nope_head_dim, v_head_dim

    def split_kv_b(self, kv_b_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight -> (W_UK [H, N, L], W_UV [H, V, L]), views."""
        per_head = kv_b_weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return per_head.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                kv_b_weight: torch.Tensor) -> torch.Tensor:
        """In the last layer of a pass that reads only the logits rows, every latent is cached but only those
        rows attend (and only they are returned)."""
        ctx = get_forward_context()
        q_nope, q_pe = q.split([self.qk_nope_head_dim, q.shape[-1] - self.qk_nope_head_dim], dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.unsqueeze(1))
        ctx.backend.write_kv(torch.cat([latent.unsqueeze(1), k_pe], dim=-1), None, self.kv_cache,
                             ctx.attn_metadata.slot_mapping)
        metadata = ctx.attn_metadata
        if self.is_last_layer and ctx.logits_rows is not None:
            q_nope, q_pe, metadata = q_nope[ctx.logits_rows], q_pe[ctx.logits_rows], ctx.logits_metadata
        w_uk, w_uv = self.split_kv_b(kv_b_weight)
        query = torch.cat([torch.einsum("thn,hnl->thl", q_nope, w_uk), q_pe], dim=-1)
        out = ctx.backend.forward(query, self.kv_cache, metadata, self.scale, value_dim=self.kv_lora_rank)
        return torch.einsum("thl,hvl->thv", out, w_uv).reshape(out.shape[0], self.num_heads * self.v_head_dim)
