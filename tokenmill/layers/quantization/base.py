"""How a linear layer stores and multiplies its weights: the interface every weight format implements.

A linear layer (layers/linear.py) owns its shape and its tensor-parallel slicing; a LinearMethod owns
what the weights are and how they are used:

    create_weights(layer, ...)           the parameters, each with the layer's weight_loader attached
    process_weights_after_loading(layer) once the checkpoint is in: repack, transpose, fold scales
    apply(layer, x, bias)                y = x @ W.T (+ bias), however W is stored

A layer whose model reads its weight as a matrix (MLA's kv_b_proj) takes its method's `dequantizing()`
instead: the same checkpoint tensors, left as one matrix of the model's dtype once loaded, on every device.

A QuantizationConfig, read from a checkpoint's `quantization_config`, picks the method of each layer
(`get_linear_method`). Models never test for a format: they pass the config and each layer's prefix
(its name in the checkpoint) to their linear layers.

A MoE layer's experts (layers/fused_moe.FusedMoE) have a MoEMethod, the same three steps over all experts of
the layer at once (`get_moe_method`): it owns the stacked expert weights' storage and the expert matmuls,
while FusedMoE keeps the routing, the tensor-parallel geometry and the all-reduce.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[..., None]


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        """Registers the layer's weight parameters (of this rank's partition) on `layer`."""

    @abstractmethod
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Prepares loaded weights for `apply`: repacking, transposing, folding scales."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [tokens, input_size_per_partition] -> [tokens, output_size_per_partition]."""

    def dequantizing(self, prefix: str) -> LinearMethod:
        """The method, for the layer named `prefix`, that reads the same checkpoint tensors and leaves
        `layer.weight` a plain [output, input] matrix of the model's dtype after loading, on every device; a
        format that cannot refuses, naming the layer."""
        raise ValueError(f"{prefix}: its weight is read as a matrix of the model's dtype (e.g. MLA's W_UK / W_UV "
                         f"views of kv_b_proj), and {type(self).__name__} weights are not dequantized at load")


class MoEMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        """Registers w13_weight [E, 2I, H] (gate rows, then up rows) and w2_weight [E, H, I] of this rank's
        partition, and any scales, on `layer`, each with a loader taking (param, tensor, shard_id, expert_id)."""

    @abstractmethod
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Prepares the loaded experts for `apply`."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], the router's choice topk_weights / topk_ids [T, k] -> [T, H], this rank's partial sum."""


class QuantizationConfig(ABC):
    """A checkpoint's weight format, built from its config.json `quantization_config`."""

    name: str = ""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """Parses the checkpoint's `quantization_config`; ValueError naming a key it cannot take."""

    @abstractmethod
    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        """The method for the linear layer named `prefix` (e.g. "model.layers.0.self_attn.qkv_proj")."""

    def get_moe_method(self, layer: nn.Module, prefix: str) -> MoEMethod:
        """The method for the experts named `prefix` (e.g. "model.layers.0.mlp.experts"); a format whose
        experts tokenmill cannot run refuses them."""
        raise ValueError(f"{prefix}: experts quantized with {self.name} are not supported")

    def get_lm_head_method(self) -> LinearMethod | None:
        """The LM head's method; None: its weight in the model's dtype, as checkpoints of most formats keep it."""
        return None
