"""Mixtral: the Llama decoder with a sparse MoE block (`block_sparse_moe`) in place of every MLP; the router's
top-k weights always sum to 1. A `sliding_window` applies to every layer (models/llama.sliding_window_of)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenmill.layers.fused_moe import SparseMoeBlock
from tokenmill.layers.quantization import QuantizationConfig
from tokenmill.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: Any, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        return SparseMoeBlock(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                              config.intermediate_size, True, quant_config, prefix)


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_cls = MixtralModel
    expert_shards = {"w1": "w1", "w3": "w3", "w2": "w2"}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's `block_sparse_moe` is the decoder layer's `mlp`."""
        return super().load_weights((name.replace(".block_sparse_moe.", ".mlp."), tensor) for name, tensor in weights)
