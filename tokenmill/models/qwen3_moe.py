"""Qwen3-MoE: Qwen3's decoder (q/k norm) with a sparse MoE block in place of the MLP on most layers.

A layer is sparse unless it is in `mlp_only_layers`, and then only every `decoder_sparse_step`-th one (layer
index + 1 a multiple of it); the others keep a dense MLP of `intermediate_size`. The router's top-k weights
are renormalized to sum to 1 when `norm_topk_prob` is set.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenmill.config import num_routed_experts
from tokenmill.layers.fused_moe import SparseMoeBlock
from tokenmill.layers.quantization import QuantizationConfig
from tokenmill.models.llama import LlamaForCausalLM, LlamaMLP, LlamaModel
from tokenmill.models.qwen3 import Qwen3DecoderLayer


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, config: Any, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        layer_index = int(prefix.split(".")[-2])
        num_experts = num_routed_experts(config)
        if layer_index in (getattr(config, "mlp_only_layers", None) or []) or num_experts == 0 \
                or (layer_index + 1) % config.decoder_sparse_step:
            return LlamaMLP(config, quant_config, prefix)
        return SparseMoeBlock(num_experts, config.num_experts_per_tok, config.hidden_size,
                              config.moe_intermediate_size, bool(config.norm_topk_prob), quant_config, prefix)


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3MoeModel
    expert_shards = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
