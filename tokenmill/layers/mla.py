"""Multi-head latent attention (DeepSeek-V2/V3): the attention layer of an MLA model, over a latent cache.

A token's keys and values come from one compressed latent c [L] (L = kv_lora_rank, normed) and one rope key
k_pe [R] shared by every head; kv_b_proj expands c per head into k_nope [N] and v [V]:

    kv_b_proj.weight [H * (N + V), L]  ->  per head  W_UK [N, L] (rows of k_nope), W_UV [V, L] (rows of v)
    score_h(t, s) = q_nope_h(t) . W_UK_h c(s) + q_pe_h(t) . k_pe(s)
                  = (W_UK_h^T q_nope_h(t)) . c(s) + q_pe_h(t) . k_pe(s)
    out_h(t)      = sum_s p_h(t, s) W_UV_h c(s) = W_UV_h (sum_s p_h(t, s) c(s))

So the cache holds only [c | k_pe] per token (L + R values, one "head", attention/backend.py's one-plane
layout). Decoding takes the absorbed path: q_nope goes through W_UK into the latent space, attention is MQA
over the cache with keys [c | k_pe] (head dim L + R) and values c (L), and the output goes through W_UV.
A prompt's tokens, in a step that runs eagerly (not replaying a CUDA graph: long prefills, and every step on
the CPU), take the expanded path instead, as vLLM's MLA does: the request's cached latents go through
kv_b_proj once to per-head k_nope and v, and it is ordinary causal attention over head dim N + R with values of
V (torch's SDPA), L + R against N + R per score and L against V per output, a quarter of the absorbed path's
FLOPs at DeepSeek's sizes. Chunked prefill and prefix hits read the whole cached context either way; the
one-token requests of a mixed step (the first num_decodes) stay absorbed.

The rope dims use the model's rotary (DeepSeek's interleaved pairs, YaRN's attention factor in cos/sin);
the softmax scale is the caller's (qk_head_dim ** -0.5, times YaRN's mscale squared where configured).
The layer owns no weights of its own: W_UK and W_UV are views of the caller's kv_b_proj, so tensor
parallelism (heads split over ranks, the latent replicated) needs nothing here.
"""

from __future__ import annotations

import dataclasses

import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.forward_context import get_forward_context
from tokenmill.layers.attention import Attention
from tokenmill.layers.rotary import RotaryEmbedding

# The longest context a prompt's tokens expand over: its keys and values per head (DeepSeek-V3: 128 heads x 256
# values x 2 bytes, 64 KiB a token) are a transient the start-up memory profile sized for one batch of tokens.
EXPANDED_MAX_CONTEXT = 8192


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
                             ctx.attn_metadata.slot_mapping, derived=ctx.attn_metadata.derived)
        metadata = ctx.attn_metadata
        if self.is_last_layer and ctx.logits_rows is not None:
            q_nope, q_pe, metadata = q_nope[ctx.logits_rows], q_pe[ctx.logits_rows], ctx.logits_metadata
        if self._expands_prompts(ctx, metadata):
            return self._with_expanded_prompts(q_nope, q_pe, metadata, kv_b_weight)
        return self._absorbed(q_nope, q_pe, metadata, kv_b_weight)

    @staticmethod
    def _expands_prompts(ctx, metadata: AttentionMetadata) -> bool:
        """Whether this step's prompt tokens take the expanded path: the step has some, and it is not a CUDA
        graph's capture (the per-request path depends on the step's lengths)."""
        return metadata.max_query_len > 1 and not ctx.graphed

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, metadata, kv_b_weight: torch.Tensor
                  ) -> torch.Tensor:
        w_uk, w_uv = self.split_kv_b(kv_b_weight)
        query = torch.cat([torch.einsum("thn,hnl->thl", q_nope, w_uk), q_pe], dim=-1)
        out = get_forward_context().backend.forward(query, self.kv_cache, metadata, self.scale,
                                                    value_dim=self.kv_lora_rank)
        return torch.einsum("thl,hvl->thv", out, w_uv).reshape(out.shape[0], self.num_heads * self.v_head_dim)

    def _with_expanded_prompts(self, q_nope: torch.Tensor, q_pe: torch.Tensor, metadata: AttentionMetadata,
                               kv_b_weight: torch.Tensor) -> torch.Tensor:
        """The step's first num_decodes requests (one token each) absorbed, every later one expanded, but for one
        whose context passes EXPANDED_MAX_CONTEXT (its per-head keys and values would take memory the start-up
        profile never saw): absorbed too."""
        out = q_nope.new_zeros(q_nope.shape[0], self.num_heads * self.v_head_dim)
        starts, seq_lens = metadata.query_start_loc_cpu.tolist(), metadata.seq_lens_cpu.tolist()

        def absorb(lo: int, hi: int) -> None:  # requests lo .. hi - 1
            rows = slice(starts[lo], starts[hi])
            out[rows] = self._absorbed(q_nope[rows], q_pe[rows], _request_range(metadata, lo, hi), kv_b_weight)

        decodes = metadata.num_decodes
        if decodes:
            absorb(0, decodes)
        block_size = self.kv_cache.shape[2]
        latent_dim, heads, nope, v_dim = self.kv_lora_rank, self.num_heads, self.qk_nope_head_dim, self.v_head_dim
        for i in range(decodes, metadata.num_reqs):
            first, last, context = starts[i], starts[i + 1], seq_lens[i]
            if first == last:
                continue
            if context > EXPANDED_MAX_CONTEXT:
                absorb(i, i + 1)
                continue
            blocks = metadata.block_table[i, :-(-context // block_size)].long()
            cached = self.kv_cache[0, blocks].reshape(-1, self.kv_cache.shape[-1])[:context]  # [S, L + R]
            latent, k_pe = cached.split([latent_dim, cached.shape[-1] - latent_dim], dim=-1)
            k_nope, value = torch.nn.functional.linear(latent, kv_b_weight).view(context, heads, nope + v_dim) \
                .split([nope, v_dim], dim=-1)
            key = torch.cat([k_nope, k_pe[:, None, :].expand(context, heads, k_pe.shape[-1])], dim=-1)
            query = torch.cat([q_nope[first:last], q_pe[first:last]], dim=-1)
            num_new = last - first
            # query j sits at position context - num_new + j and sees keys 0 .. that position
            mask = None if num_new == context else torch.ones(num_new, context, dtype=torch.bool,
                                                              device=query.device).tril(context - num_new)
            attended = torch.nn.functional.scaled_dot_product_attention(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), attn_mask=mask,
                is_causal=mask is None, scale=self.scale)
            out[first:last] = attended.transpose(0, 1).reshape(num_new, heads * v_dim)
        return out


def _request_range(metadata: AttentionMetadata, lo: int, hi: int) -> AttentionMetadata:
    """The metadata of a step's requests lo .. hi - 1 alone (their tokens first to last)."""
    starts_cpu = metadata.query_start_loc_cpu[lo:hi + 1]
    first, last = int(starts_cpu[0]), int(starts_cpu[-1])
    decodes_only = lo == 0 and hi == metadata.num_decodes  # the decode order covers exactly these
    return dataclasses.replace(
        metadata, num_actual_tokens=last - first, num_reqs=hi - lo,
        max_query_len=int((starts_cpu[1:] - starts_cpu[:-1]).max()),
        max_seq_len=int(metadata.seq_lens_cpu[lo:hi].max()),
        query_start_loc=metadata.query_start_loc[lo:hi + 1] - first, seq_lens=metadata.seq_lens[lo:hi],
        block_table=metadata.block_table[lo:hi], slot_mapping=metadata.slot_mapping[first:last],
        query_start_loc_cpu=starts_cpu - first, seq_lens_cpu=metadata.seq_lens_cpu[lo:hi], num_decodes=0,
        decode_order=metadata.decode_order if decodes_only else None, derived={})
