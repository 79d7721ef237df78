"""The per-step attention context: set once around a forward pass, read by every attention layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    backend: AttentionBackend
    # Set when only each request's last row is read after the forward pass (its logits): the rows of
    # the hidden states the last layer computes past attention, and attention metadata with those rows
    # as one query each over all the request's keys.
    logits_rows: torch.Tensor | None = None
    logits_metadata: AttentionMetadata | None = None
    # Set around the forward passes a CUDA graph captures, and their warm-up: a layer takes only paths whose
    # launches depend on tensor shapes alone (a replay reruns them with other lengths).
    graphed: bool = False


_context: ForwardContext | None = None


@contextmanager
def set_forward_context(attn_metadata: AttentionMetadata, backend: AttentionBackend,
                        logits_rows: torch.Tensor | None = None,
                        logits_metadata: AttentionMetadata | None = None, graphed: bool = False) -> Iterator[None]:
    global _context
    if _context is not None:
        raise RuntimeError("forward contexts do not nest")
    _context = ForwardContext(attn_metadata, backend, logits_rows, logits_metadata, graphed)
    try:
        yield
    finally:
        _context = None


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("attention called outside set_forward_context()")
    return _context
