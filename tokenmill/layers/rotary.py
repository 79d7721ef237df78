"""Rotary position embedding, with linear, llama3 and YaRN frequency scaling.

Two layouts of the rotated dims: "rotate half" (HF Llama/Qwen: dim i pairs with dim i + d/2) and interleaved
(DeepSeek: dims 2i and 2i + 1 form a pair), whose output puts the pairs' first halves before their second
halves, as HF's DeepSeek code does (the keys are only ever multiplied with queries rotated the same way).
YaRN also scales cos and sin by its attention factor; MLA models scale the softmax as well
(yarn_softmax_scale).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_parameters(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from a HF config, whether it uses `rope_parameters` (v5) or `rope_theta`/`rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = params if params.get("rope_type", "default") != "default" else None
        return theta, scaling
    theta = float(getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3, yarn)")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: the frequencies interpolated by `factor` below the high-rotation dims, extrapolated above, and
    ramped linearly between the dims that rotate beta_fast and beta_slow times over the original length."""
    factor, old_len = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dim_of(num_rotations: float) -> float:
        return head_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001))
    extrapolated = 1 - ramp.clamp(0, 1)
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated


def _attention_factor(scaling: dict[str, Any] | None) -> float:
    """What YaRN multiplies cos and sin by (1 for the other scalings)."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = float(scaling["factor"]), scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def yarn_softmax_scale(scale: float, scaling: dict[str, Any] | None) -> float:
    """An MLA model's softmax scale: under YaRN with `mscale_all_dim`, times mscale squared (DeepSeek's rule,
    covering the dims without rotation too)."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "yarn" or not scaling.get("mscale_all_dim"):
        return scale
    return scale * _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None = None,
                 interleaved: bool = False) -> None:
        super().__init__()
        self.head_dim, self.interleaved = head_dim, interleaved
        inv_freq = _inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        factor = _attention_factor(scaling)
        # [max_position, head_dim // 2] each; float32, cast to the activations' dtype when applied
        self.register_buffer("cos_cache", freqs.cos() * factor, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * factor, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, derived: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim] -> rotated. `derived`: the step's
        AttentionMetadata.derived, where the tables gathered for its positions are kept for the next layers.
        (On GPU the attention layer applies the caches with `triton_ops.qk_norm_rope_inplace` instead.)"""
        if self.interleaved:
            cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
            sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
            return _rotate_interleaved(q, cos, sin), _rotate_interleaved(k, cos, sin)
        key = ("rope", id(self), q.dtype)
        tables = None if derived is None else derived.get(key)
        if tables is None:  # over the whole head: cos twice, sin negated then as is
            cos, sin = self.cos_cache[positions], self.sin_cache[positions]
            tables = (torch.cat((cos, cos), -1).unsqueeze(1).to(q.dtype),
                      torch.cat((-sin, sin), -1).unsqueeze(1).to(q.dtype))
            if derived is not None:
                derived[key] = tables
        return _rotate_half(q, *tables), _rotate_half(k, *tables)


_SHARED: dict[tuple, RotaryEmbedding] = {}


def get_rope(head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None = None,
             interleaved: bool = False) -> RotaryEmbedding:
    """One RotaryEmbedding per (shape, frequencies, layout, device) for every layer that uses it: its tables
    are computed once, not once a layer (a tenth of a second of a small model's CPU start-up)."""
    key = (head_dim, max_position, theta, repr(sorted((scaling or {}).items())), interleaved,
           str(torch.get_default_device()))
    if key not in _SHARED:
        _SHARED[key] = RotaryEmbedding(head_dim, max_position, theta, scaling, interleaved)
    return _SHARED[key]


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + [x2, x1] * [-sin, sin]: [x1 cos - x2 sin, x2 cos + x1 sin], HF's products and sums in four ops."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
