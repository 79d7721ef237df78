"""Rotary position embedding (the "rotate half" layout of HF Llama/Qwen), with linear, llama3 and YaRN frequency
scaling. YaRN (GPT-OSS) also scales the cos/sin tables by its attention factor, as HF does, so the kernels
that read the tables need nothing more."""

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
        return _yarn_inv_freq(head_dim, theta, scaling)
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


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN's frequencies: the original ones where a dimension turns more than beta_fast times over the original
    context, divided by `factor` where it turns fewer than beta_slow times, a linear ramp between."""
    factor, old_len = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_turning(turns: float) -> float:  # the dimension whose wavelength fits `turns` times in old_len
        return head_dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    wavelength_factors = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return 1.0 / (factor * wavelength_factors) * ramp + 1.0 / wavelength_factors * (1 - ramp)


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """What YaRN multiplies cos and sin by (its `attention_factor`, else 0.1 ln(factor) + 1, or the ratio of
    two such with `mscale` / `mscale_all_dim`); 1 for every other scaling."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(weight: float = 1.0) -> float:
        return 0.1 * weight * math.log(factor) + 1.0 if factor > 1 else 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = _inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        mscale = attention_factor(scaling)
        # [max_position, head_dim // 2] each; float32, cast to the activations' dtype when applied
        self.register_buffer("cos_cache", freqs.cos() * mscale, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * mscale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim] -> rotated. (On GPU the attention
        layer applies the caches with `triton_ops.qk_norm_rope_inplace` instead.)"""
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


_SHARED: dict[tuple, RotaryEmbedding] = {}


def get_rope(head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None = None) -> RotaryEmbedding:
    """One RotaryEmbedding per (shape, frequencies, device) for every layer that uses it: its tables are
    computed once, not once a layer (a tenth of a second of a small model's CPU start-up)."""
    key = (head_dim, max_position, theta, repr(sorted((scaling or {}).items())), str(torch.get_default_device()))
    if key not in _SHARED:
        _SHARED[key] = RotaryEmbedding(head_dim, max_position, theta, scaling)
    return _SHARED[key]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
