"""Pure-PyTorch attention over the paged KV cache: the CPU backend and the oracle for the kernels.

Sliding windows and sinks are masks: a window narrows each query's boolean key mask; sinks turn it into an
additive one with one more key column (see _sdpa)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX


def gather_keys_values(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int, value_dim: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `seq_len` keys and values of one request: [seq_len, num_kv_heads, head_dim] each (values of a
    latent cache: [seq_len, 1, value_dim])."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv = kv_cache[:, block_ids].reshape(kv_cache.shape[0], -1, num_kv_heads, head_dim)
    return split_planes(kv[:, :seq_len], value_dim)


def split_planes(kv: torch.Tensor, value_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of cache planes [planes, ...]: a latent cache's one plane holds keys whose first
    value_dim channels are the values."""
    if kv.shape[0] == 1:
        return kv[0], kv[0][..., :value_dim]
    return kv[0], kv[1]


def widen(cache_values: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values read from the cache in the queries' dtype: an FP8 cache's times their scale."""
    if cache_values.dtype == dtype:
        return cache_values
    return (cache_values.to(torch.float32) * scale).to(dtype)


@register_backend
class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor | None, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | float = 1.0,
                 v_scale: torch.Tensor | float = 1.0, derived: dict | None = None) -> None:
        num_tokens = slot_mapping.shape[0]
        slots = None if derived is None else derived.get("torch_slots")
        if slots is None:  # the valid slots and, if some are -1, the mask of their rows
            valid = slot_mapping >= 0
            slots = (slot_mapping, None) if bool(valid.all()) else (slot_mapping[valid], valid)
            if derived is not None:
                derived["torch_slots"] = slots
        slots, valid = slots
        flat = kv_cache.view(kv_cache.shape[0], -1, *kv_cache.shape[-2:])
        for plane, (new, scale) in enumerate(((key, k_scale), (value, v_scale))[:kv_cache.shape[0]]):
            if new.shape[0] != num_tokens:
                new = new[:num_tokens]
            if valid is not None:
                new = new[valid]
            if kv_cache.dtype == FP8_DTYPE:
                new = (new.float() / scale).clamp(-FP8_MAX, FP8_MAX)
            flat[plane, slots] = new if new.dtype == kv_cache.dtype else new.to(kv_cache.dtype)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float, *, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                k_scale: torch.Tensor | float = 1.0, v_scale: torch.Tensor | float = 1.0,
                sliding_window: int | None = None, sinks: torch.Tensor | None = None,
                value_dim: int | None = None) -> torch.Tensor:
        scales = (k_scale, v_scale)
        block_size = kv_cache.shape[2]
        plan = _plan(metadata, block_size)
        if plan.decode is not None and plan.decode.every_row and query.shape[0] == metadata.num_reqs:
            return self._decode(query, kv_cache, plan.decode, scale, None, scales, value_dim, sliding_window, sinks)
        out = query.new_zeros(*query.shape[:2], value_dim or query.shape[2])
        starts, seq_lens = plan.starts, plan.seq_lens
        if plan.decode is not None:
            self._decode(query, kv_cache, plan.decode, scale, out, scales, value_dim, sliding_window, sinks)
        for i in range(metadata.num_reqs):
            q_len = starts[i + 1] - starts[i]
            if q_len <= 1:
                continue
            num_blocks = -(-seq_lens[i] // block_size)
            k, v = gather_keys_values(kv_cache, metadata.block_table[i, :num_blocks], seq_lens[i], value_dim)
            k, v = widen(k, k_scale, query.dtype), widen(v, v_scale, query.dtype)
            q = query[starts[i]:starts[i + 1]]
            q_pos = torch.arange(seq_lens[i] - q_len, seq_lens[i], device=q.device)
            mask = visible_keys(torch.arange(seq_lens[i], device=q.device)[None, :], q_pos[:, None], sliding_window)
            out[starts[i]:starts[i + 1]] = _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                                 mask.unsqueeze(0), scale, sinks)[0]
        return out

    def _decode(self, query, kv_cache, plan: _DecodePlan, scale, out, scales, value_dim, sliding_window,
                sinks) -> torch.Tensor:
        """All single-token queries at once, keys padded to the longest and masked, into their rows of `out`;
        or, when they are every row in order, as the output (out None)."""
        # index_select, not kv_cache[:, block_ids]: advanced indexing on the second dimension costs 2-3x as much
        kv = kv_cache.index_select(1, plan.block_ids.view(-1))  # [planes, B * max_blocks, block_size, H_kv, D]
        kv = kv.view(kv.shape[0], plan.block_ids.shape[0], -1, *kv_cache.shape[-2:])[:, :, :plan.num_keys]
        keys, values = split_planes(kv, value_dim)
        keys, values = widen(keys, scales[0], query.dtype), widen(values, scales[1], query.dtype)
        q = (query if out is None else query[plan.token_index]).unsqueeze(1)  # [B, 1, H, D]
        attended = _sdpa(q, keys, values, plan.mask(sliding_window), scale, sinks)[:, 0]
        if out is None:
            return attended
        out[plan.token_index] = attended
        return out


def visible_keys(key_pos: torch.Tensor, query_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Whether a query at query_pos sees the key at key_pos (broadcast): causal, and within the window."""
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    return visible


@dataclass
class _DecodePlan:
    block_ids: torch.Tensor  # [B, max_blocks] int64: the single-token requests' blocks
    num_keys: int  # the keys read
    query_pos: torch.Tensor  # [B, 1]: their positions
    token_index: torch.Tensor  # [B]: their rows of the query
    every_row: bool  # they are the step's every row, in order
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by window: [B, 1, num_keys]

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """The keys each query attends to, built once a step for each window the layers have; None (all of
        them: SDPA's unmasked path) for one request without a window, which reads exactly its keys."""
        if sliding_window is None and self.query_pos.shape[0] == 1:
            return None
        if sliding_window not in self.masks:
            keys = torch.arange(self.num_keys, device=self.query_pos.device)
            self.masks[sliding_window] = visible_keys(keys[None, :], self.query_pos, sliding_window).unsqueeze(1)
        return self.masks[sliding_window]


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
        query_pos = torch.tensor(lens, device=device)[:, None] - 1
        # One request reads exactly its keys, unmasked; a batch reads whole blocks under its mask (cutting them
        # to the longest request changes SDPA's blocking, and the embedded model's greedy tokens with it)
        num_keys = lens[0] if len(rows) == 1 else max_blocks * block_size
        decode = _DecodePlan(block_ids, num_keys, query_pos, torch.tensor([starts[i] for i in rows], device=device),
                             len(rows) == metadata.num_reqs == starts[-1] == metadata.num_actual_tokens)
    plan = metadata.derived["torch"] = _Plan(starts, seq_lens, decode)
    return plan


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Lq, H, D], k: [B, Lk, H_kv, D], v: [B, Lk, H_kv, Dv], mask: [B, Lq, Lk] (True = attend; None: every
    key), sinks: [H] or None -> [B, Lq, H, Dv].

    Grouped-query attention without copying K/V: the G query heads that share a KV head become G times
    as many query rows of that head ([B, H_kv, G * Lq, D]), each with its position's mask row. Sinks are
    one more key of zeros (score 0, no value) whose additive mask is the head's sink logit.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    if q_len == 1:  # the heads of a KV head are already adjacent rows
        q = q.reshape(batch, num_kv_heads, group, head_dim)
    else:
        q = q.view(batch, q_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(batch, num_kv_heads, group * q_len, head_dim)
    if mask is None and sinks is not None:
        mask = torch.ones(batch, q_len, k.shape[1], dtype=torch.bool, device=q.device)
    if mask is not None:
        mask = mask.unsqueeze(1).expand(batch, group, q_len, mask.shape[-1]).reshape(batch, 1, group * q_len, -1)
    if sinks is not None:
        k, v = (F.pad(t, (0, 0, 0, 0, 0, 1)) for t in (k, v))
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        sink_logits = sinks.to(q.dtype).view(1, num_kv_heads, group, 1, 1).expand(batch, -1, -1, q_len, 1)
        mask = torch.cat([bias.expand(batch, num_kv_heads, -1, -1),
                          sink_logits.reshape(batch, num_kv_heads, group * q_len, 1)], dim=-1)
    o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    if q_len == 1:
        return o.reshape(batch, 1, num_heads, -1)
    o = o.view(batch, num_kv_heads, group, q_len, -1).permute(0, 3, 1, 2, 4)
    return o.reshape(batch, q_len, num_heads, -1)
