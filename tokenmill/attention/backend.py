"""The attention backend interface: per-step metadata and the two operations a backend provides.

KV cache layout, one tensor per layer, allocated once:

    kv_cache[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim]
                      ^ 0 = keys, 1 = values

in the model's dtype, or FP8 (e4m3) holding key / k_scale and value / v_scale (the layer's scales).

MLA's latent cache (layers/mla.py) has one plane: kv_cache[layer]: [1, num_blocks, block_size, 1, latent +
rope], each token's compressed latent then its rotated rope key. Attention over it is MQA with that one head:
the keys are the entries and the values their first `value_dim` (latent) channels, so the output is
[num_tokens, num_heads, value_dim].

A token at position `pos` of a request lives in slot
`block_table[pos // block_size] * block_size + pos % block_size`; flat slot `s` is
`kv_cache[:, s // block_size, s % block_size]`.

Tokens of one step are packed request after request ("varlen"):

    query:           [num_tokens, num_heads, head_dim]
    query_start_loc: [num_reqs + 1]   request i owns query rows query_start_loc[i] : query_start_loc[i+1]
    seq_lens:        [num_reqs]       tokens in the cache for request i once this step's keys are written
                                      (cached prefix + new tokens); its new tokens sit at the end, so
                                      query row j of request i has position seq_lens[i] - q_len_i + j
    block_table:     [num_reqs, max_blocks_per_seq]
    slot_mapping:    [num_tokens]     where each new key/value goes; -1 means "padding, write nothing"

Attention is causal: a query at position p sees keys at positions 0..p of its own request; a layer with a
sliding window of W sees only the last W of them, positions p - W + 1..p (HF's sliding mask). A layer with
sinks (GPT-OSS) has one learned logit per query head that joins the softmax's denominator as a key with no
value: softmax over [scores, sink], the sink's share dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    num_actual_tokens: int  # rows of `query` that are real tokens; rows past it are padding
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, on the model's device
    seq_lens: torch.Tensor  # [num_reqs] int32, on the model's device
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_seq] int32, on the model's device
    slot_mapping: torch.Tensor  # [num_tokens] int64, on the model's device
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1] int32, host copy
    seq_lens_cpu: torch.Tensor  # [num_reqs] int32, host copy
    # In a step mixing one-token requests with longer ones, the one-token requests come first: there are
    # num_decodes of them, and a backend may give them a launch of their own (0: no such split).
    num_decodes: int = 0
    # Decode steps (one token per request): int32 [num_tokens], the requests by ascending seq_len with the
    # padding tokens' rows after them; mixed steps: int32 [num_decodes], the one-token requests by ascending
    # seq_len. A backend may use it to start the longest first (None: not given).
    decode_order: torch.Tensor | None = None
    # What a backend derives from this step's metadata once and every layer reuses (by key)
    derived: dict[str, Any] = field(default_factory=dict)


class AttentionBackend(ABC):
    """A way to write new keys/values into the paged cache and to attend over it."""

    name: str = ""
    # Its launches depend only on tensor shapes and it never syncs with the host, so steps through it can
    # be captured in CUDA graphs and replayed with new metadata.
    supports_cuda_graphs: bool = False

    @abstractmethod
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor | None, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | float = 1.0, v_scale: torch.Tensor | float = 1.0, derived: dict | None = None,
    ) -> None:
        """Store key/value [num_tokens, num_kv_heads, head_dim] into their slots; slot -1 is skipped. An FP8
        cache stores key / k_scale and value / v_scale. A one-plane (latent) cache takes value=None.
        `derived`: the step's AttentionMetadata.derived, where a backend may keep what it works out from
        slot_mapping for the next layers."""

    @abstractmethod
    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
        *, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
        k_scale: torch.Tensor | float = 1.0, v_scale: torch.Tensor | float = 1.0,
        sliding_window: int | None = None, sinks: torch.Tensor | None = None, value_dim: int | None = None,
    ) -> torch.Tensor:
        """Causal attention of query [num_tokens, num_heads, head_dim] over the paged cache.

        Keys of this step must already be written; `key`/`value` are those same new keys and values
        [num_tokens, num_kv_heads, head_dim], which a backend may attend over directly where a request
        has no cached ones. `sliding_window`: the keys a query sees, itself included (None: all before it);
        `sinks`: [num_heads] logits, one per query head, in the softmax's denominator (None: none).
        Returns [num_tokens, num_heads, head_dim]; rows past `metadata.num_actual_tokens` are unspecified.
        Over a one-plane (latent) cache the values are the keys' first `value_dim` channels and the result is
        [num_tokens, num_heads, value_dim].
        """


_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        # Importing the modules registers their backends.
        from tokenmill.attention import torch_ref  # noqa: F401

        if name == "triton":
            from tokenmill.attention import triton_paged  # noqa: F401
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()


def default_backend_name(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch"
