"""The per-step attention context: set once around a forward pass, read by every attention layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    backend: AttentionBackend


_context: ForwardContext | None = None


@contextmanager
def set_forward_context(attn_metadata: AttentionMetadata, backend: AttentionBackend) -> Iterator[None]:
    global _context
    if _context is not None:
        raise RuntimeError("forward contexts do not nest")
    _context = ForwardContext(attn_metadata, backend)
    try:
        yield
    finally:
        _context = None


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("attention called outside set_forward_context()")
    return _context
