"""DeepSeek-V2 and DeepSeek-V3: the Llama decoder with multi-head latent attention (layers/mla.py) and,
past the first `first_k_dense_replace` layers (every `moe_layer_freq`-th), a DeepSeek MoE block in place of
the MLP: routed experts (FusedMoE) plus `n_shared_experts` experts' worth of an always-on MLP.

Attention: q through q_a_proj -> q_a_layernorm -> q_b_proj, or one q_proj where q_lora_rank is None;
kv_a_proj_with_mqa gives the latent (kv_lora_rank, then kv_a_layernorm) and the rope key shared by all heads;
the latent and the rotated rope key are what the cache keeps. Both q_a and kv_a are replicated over the
tensor-parallel ranks; q_b/q_proj and kv_b_proj split the heads (column-parallel), o_proj is row-parallel.

Routers: V2 takes the softmax's top-k, limited to the `topk_group` best of `n_group` groups when
`topk_method` is "group_limited_greedy"; V3 scores with a sigmoid, chooses by the scores plus
`e_score_correction_bias` within the best groups. Both renormalize per `norm_topk_prob` (vLLM's reading;
HF's V2 code never renormalizes, and V2 checkpoints ship norm_topk_prob false) and scale by
`routed_scaling_factor`. The router runs in float32, as HF keeps `gate.weight`.

Quantized checkpoints (DeepSeek-V3's own, block-scaled FP8: `weight_block_size` [128, 128] with a
`weight_scale_inv` beside each FP8 matrix): every linear layer takes the checkpoint's quant config, the
replicated q_a / kv_a ones, the routed experts (FusedMoE) and the shared experts included; the router `gate` and
the norms stay unquantized, as the checkpoints keep them. kv_b_proj is the exception: MLA reads W_UK / W_UV as
views of its matrix, so it is built with `dense_weight` and dequantized to the model's dtype at load (vLLM
dequantizes it too); it is [heads * (N + V), L], small beside the experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import get_tp_size
from tokenmill.layers.fused_moe import FusedMoE
from tokenmill.layers.layernorm import RMSNorm
from tokenmill.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from tokenmill.layers.mla import MLAAttention
from tokenmill.layers.quantization import QuantizationConfig
from tokenmill.layers.rotary import get_rope, rope_parameters, yarn_softmax_scale
from tokenmill.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel

# HF's DeepSeek modules build q_a_layernorm and kv_a_layernorm with their default eps, not rms_norm_eps.
LORA_NORM_EPS = 1e-6


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: Any, max_position: int, quant_config: QuantizationConfig | None, prefix: str,
                 is_last_layer: bool) -> None:
        super().__init__()
        num_heads, tp_size = config.num_attention_heads, get_tp_size()
        if num_heads % tp_size:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tensor_parallel_size {tp_size}")
        nope, rope, v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        latent, bias = config.kv_lora_rank, bool(getattr(config, "attention_bias", False))
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(config.hidden_size, num_heads * (nope + rope),
                                               quant_config=quant_config, prefix=f"{prefix}.q_proj")
        else:
            self.q_a_proj = ReplicatedLinear(config.hidden_size, self.q_lora_rank, bias, quant_config,
                                             f"{prefix}.q_a_proj")
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, num_heads * (nope + rope),
                                                 quant_config=quant_config, prefix=f"{prefix}.q_b_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(config.hidden_size, latent + rope, bias, quant_config,
                                                   f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(latent, LORA_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(latent, num_heads * (nope + v_dim), quant_config=quant_config,
                                              prefix=f"{prefix}.kv_b_proj", dense_weight=True)
        self.o_proj = RowParallelLinear(num_heads * v_dim, config.hidden_size, bias=bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.num_local_heads, self.latent_dim, self.rope_dim = num_heads // tp_size, latent, rope
        theta, scaling = rope_parameters(config)
        rotary = get_rope(rope, max_position, theta, scaling, interleaved=getattr(config, "rope_interleave", True))
        scale = yarn_softmax_scale((nope + rope) ** -0.5, scaling)
        self.attn = MLAAttention(self.num_local_heads, latent, nope, rope, v_dim, scale, rotary, is_last_layer)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.latent_dim, self.rope_dim], dim=-1)
        out = self.attn(positions, q.view(q.shape[0], self.num_local_heads, -1), self.kv_a_layernorm(latent), k_pe,
                        self.kv_b_proj.weight)
        return self.o_proj(out)


class DeepseekRouter(nn.Module):
    """The router `gate`: logits [T, E] in float32 from a float32 [E, H] matrix (on every rank); V3's also
    holds the experts' score correction bias."""

    def __init__(self, num_experts: int, hidden_size: int, has_correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                     requires_grad=False) if has_correction_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)


class DeepseekV2MoE(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None, prefix: str, is_v3: bool) -> None:
        super().__init__()
        num_experts = config.n_routed_experts
        grouped = is_v3 or getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        self.gate = DeepseekRouter(num_experts, config.hidden_size, has_correction_bias=is_v3)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size, bool(config.norm_topk_prob), f"{prefix}.experts",
                                scoring_func="sigmoid" if is_v3 else "softmax",
                                num_expert_group=config.n_group if grouped else None,
                                topk_group=config.topk_group if grouped else None,
                                routed_scaling_factor=float(config.routed_scaling_factor),
                                quant_config=quant_config)
        num_shared = getattr(config, "n_shared_experts", None) or 0
        self.shared_experts = (LlamaMLP(config, quant_config, f"{prefix}.shared_experts",
                                        config.moe_intermediate_size * num_shared) if num_shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x), self.gate.e_score_correction_bias)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class DeepseekV2DecoderLayer(LlamaDecoderLayer):
    attention_cls = DeepseekV2Attention
    is_v3 = False

    def make_mlp(self, config: Any, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        layer_index = int(prefix.split(".")[-2])
        if not config.n_routed_experts or layer_index < config.first_k_dense_replace \
                or layer_index % getattr(config, "moe_layer_freq", 1):
            return LlamaMLP(config, quant_config, prefix)
        return DeepseekV2MoE(config, quant_config, prefix, self.is_v3)


class DeepseekV3DecoderLayer(DeepseekV2DecoderLayer):
    is_v3 = True


class DeepseekV2Model(LlamaModel):
    layer_cls = DeepseekV2DecoderLayer


class DeepseekV3Model(LlamaModel):
    layer_cls = DeepseekV3DecoderLayer


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    model_cls = DeepseekV2Model
    # Only the MLPs' gate/up are packed; the attention's projections load by their own names.
    packed_modules = {".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}
    expert_shards = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    model_cls = DeepseekV3Model
