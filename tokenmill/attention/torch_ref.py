"""Pure-PyTorch attention over the paged KV cache: the CPU backend and the oracle for the kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX


def gather_keys_values(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `seq_len` keys and values of one request: [seq_len, num_kv_heads, head_dim] each."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv = kv_cache[:, block_ids].reshape(2, -1, num_kv_heads, head_dim)
    return kv[0, :seq_len], kv[1, :seq_len]


def widen(cache_values: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values read from the cache in the queries' dtype: an FP8 cache's times their scale."""
    if cache_values.dtype == dtype:
        return cache_values
    return (cache_values.to(torch.float32) * scale).to(dtype)


@register_backend
class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | float = 1.0,
                 v_scale: torch.Tensor | float = 1.0) -> None:
        num_tokens = slot_mapping.shape[0]
        valid = slot_mapping >= 0
        slots = slot_mapping[valid]
        flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])
        key, value = key[:num_tokens][valid], value[:num_tokens][valid]
        if kv_cache.dtype == FP8_DTYPE:
            key = (key.float() / k_scale).clamp(-FP8_MAX, FP8_MAX)
            value = (value.float() / v_scale).clamp(-FP8_MAX, FP8_MAX)
        flat[0, slots] = key.to(kv_cache.dtype)
        flat[1, slots] = value.to(kv_cache.dtype)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float, *, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                k_scale: torch.Tensor | float = 1.0, v_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        scales = (k_scale, v_scale)
        out = torch.zeros_like(query)
        block_size = kv_cache.shape[2]
        plan = _plan(metadata, block_size)
        starts, seq_lens = plan.starts, plan.seq_lens
        if plan.decode is not None:
            self._decode(query, kv_cache, plan.decode, scale, out, scales)
        for i in range(metadata.num_reqs):
            q_len = starts[i + 1] - starts[i]
            if q_len <= 1:
                continue
            num_blocks = -(-seq_lens[i] // block_size)
            k, v = gather_keys_values(kv_cache, metadata.block_table[i, :num_blocks], seq_lens[i])
            k, v = widen(k, k_scale, query.dtype), widen(v, v_scale, query.dtype)
            q = query[starts[i]:starts[i + 1]]
            q_pos = torch.arange(seq_lens[i] - q_len, seq_lens[i], device=q.device)
            mask = torch.arange(seq_lens[i], device=q.device)[None, :] <= q_pos[:, None]
            out[starts[i]:starts[i + 1]] = _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                                 mask.unsqueeze(0), scale)[0]
        return out

    def _decode(self, query, kv_cache, plan: _DecodePlan, scale, out, scales) -> None:
        """All single-token queries at once, keys padded to the longest and masked."""
        # index_select, not kv_cache[:, block_ids]: advanced indexing on the second dimension costs 2-3x as much
        kv = kv_cache.index_select(1, plan.block_ids.view(-1))  # [2, B * max_blocks, block_size, H_kv, D]
        kv = kv.view(2, plan.block_ids.shape[0], -1, *kv_cache.shape[-2:])[:, :, :plan.num_keys]
        keys, values = widen(kv[0], scales[0], query.dtype), widen(kv[1], scales[1], query.dtype)
        q = query[plan.token_index].unsqueeze(1)  # [B, 1, H, D]
        out[plan.token_index] = _sdpa(q, keys, values, plan.mask, scale)[:, 0]


@dataclass
class _DecodePlan:
    block_ids: torch.Tensor  # [B, max_blocks] int64: the single-token requests' blocks
    mask: torch.Tensor | None  # [B, 1, num_keys]: the keys each attends to; None: all (a single request)
    num_keys: int  # the keys read: the longest request's
    token_index: torch.Tensor  # [B]: their rows of the query


@dataclass
class _Plan:
    """What every layer's attention reads from one step's metadata, computed once a step (the layers share
    the metadata object): 30 layers rebuilding it cost the embedded model 3 ms of a 24 ms CPU decode step."""

    starts: list[int]
    seq_lens: list[int]
    decode: _DecodePlan | None


def _plan(metadata: AttentionMetadata, block_size: int) -> _Plan:
    plan = metadata.derived.get("torch")
    if plan is not None:
        return plan
    starts, seq_lens = metadata.query_start_loc_cpu.tolist(), metadata.seq_lens_cpu.tolist()
    rows = [i for i in range(metadata.num_reqs) if starts[i + 1] - starts[i] == 1]
    decode = None
    if rows:
        device = metadata.block_table.device
        lens = [seq_lens[i] for i in rows]
        max_blocks = -(-max(lens) // block_size)
        block_ids = metadata.block_table[torch.tensor(rows, device=device), :max_blocks].long()
        num_keys = max(lens)
        mask = None  # one request reads exactly its keys: SDPA's unmasked path
        if len(rows) > 1:
            mask = (torch.arange(num_keys, device=device)[None, :] < torch.tensor(lens, device=device)[:, None])
            mask = mask.unsqueeze(1)
        decode = _DecodePlan(block_ids, mask, num_keys, torch.tensor([starts[i] for i in rows], device=device))
    plan = metadata.derived["torch"] = _Plan(starts, seq_lens, decode)
    return plan


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
          ) -> torch.Tensor:
    """q: [B, Lq, H, D], k/v: [B, Lk, H_kv, D], mask: [B, Lq, Lk] (True = attend; None: every key) -> [B, Lq, H, D].

    Grouped-query attention without copying K/V: the G query heads that share a KV head become G times
    as many query rows of that head ([B, H_kv, G * Lq, D]), each with its position's mask row.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    q = q.view(batch, q_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(batch, num_kv_heads, group * q_len, head_dim)
    if mask is not None:
        mask = mask.unsqueeze(1).expand(batch, group, q_len, mask.shape[-1]).reshape(batch, 1, group * q_len, -1)
    o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    o = o.view(batch, num_kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return o.reshape(batch, q_len, num_heads, head_dim)
