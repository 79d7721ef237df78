"""GPT-OSS (openai/gpt-oss-20b, -120b): the Llama decoder with these differences.

- Attention: biases on q/k/v/o; per query head a learned sink logit (`self_attn.sinks`) in the softmax's
  denominator; `layer_types` alternates sliding-window (128 keys) and full layers; YaRN rope.
- MLP: a MoE block. The router is a linear layer with a bias; each token's top-k experts are weighted by a
  softmax over the chosen k logits (the same as select_experts' softmax, top-k and renormalization). Experts
  have biases and the clamped SwiGLU ("swigluoai", layers/fused_moe.py).

Checkpoints store all experts of a layer stacked, in HF's layout: gate_up_proj [E, H, 2I] with gate and up in
alternate columns (x @ gate_up_proj), down_proj [E, I, H], biases gate_up_proj_bias [E, 2I] (interleaved too)
and down_proj_bias [E, H]. The published checkpoints hold the two matrices as MXFP4 instead
(`*_blocks`/`*_scales`, output rows first, see layers/quantization/mxfp4.py), loaded as they are (codes and
exponents). Either way each expert's gate and up rows go into FusedMoE's w13 (gate rows, then up rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from tokenmill.distributed.parallel_state import get_tp_rank
from tokenmill.layers.fused_moe import SWIGLU_ALPHA, SWIGLU_LIMIT, FusedMoE
from tokenmill.layers.quantization import QuantizationConfig
from tokenmill.layers.quantization.mxfp4 import Mxfp4Config
from tokenmill.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

# A checkpoint's stacked experts: "<layer>.mlp.experts.<gate_up_proj|down_proj>[_bias|_blocks|_scales]"
_EXPERTS = ".mlp.experts."


class GptOssAttention(LlamaAttention):
    """Llama's attention (config.attention_bias puts biases on q/k/v/o) with this rank's heads' sinks."""

    def __init__(self, config: Any, max_position: int, quant_config: QuantizationConfig | None, prefix: str,
                 is_last_layer: bool) -> None:
        super().__init__(config, max_position, quant_config, prefix, is_last_layer)
        num_heads = self.qkv_proj.num_heads
        self.sinks = nn.Parameter(torch.empty(num_heads), requires_grad=False)
        first_head = get_tp_rank() * num_heads
        self.sinks.weight_loader = lambda param, loaded: param.data.copy_(loaded.narrow(0, first_head, num_heads))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attn(positions, self.qkv_proj(hidden_states), sinks=self.sinks))


class GptOssMoE(nn.Module):
    """The router (`router`, [E, H] with a bias, on every rank) and the `experts`."""

    def __init__(self, config: Any, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        if quant_config is not None and not isinstance(quant_config, Mxfp4Config):
            raise ValueError(f"{prefix}: GPT-OSS experts are bf16 or MXFP4, not {quant_config.name}")
        for field, value in (("swiglu_alpha", SWIGLU_ALPHA), ("swiglu_limit", SWIGLU_LIMIT)):
            if getattr(config, field, value) != value:
                raise ValueError(f"config.{field} = {getattr(config, field)}: GPT-OSS's experts are built for "
                                 f"{value} only")
        num_experts = config.num_local_experts
        self.router = nn.Linear(config.hidden_size, num_experts, bias=True)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.intermediate_size, True, f"{prefix}.experts", has_bias=True,
                                activation="swigluoai", quant_config=quant_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.router(x))


class GptOssDecoderLayer(LlamaDecoderLayer):
    attention_cls = GptOssAttention

    def make_mlp(self, config: Any, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        return GptOssMoE(config, quant_config, prefix)


class GptOssModel(LlamaModel):
    layer_cls = GptOssDecoderLayer


class GptOssForCausalLM(LlamaForCausalLM):
    model_cls = GptOssModel

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Llama's loading, with the stacked experts taken out of the stream and loaded expert by expert."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        loaded |= super().load_weights(self._without_experts(weights, params, loaded))
        return loaded

    def _without_experts(self, weights: Iterable[tuple[str, torch.Tensor]], params: dict[str, nn.Parameter],
                         loaded: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Passes on every tensor but the experts'; loads those (an MXFP4 matrix once both its blocks and its
        scales have come), adding their parameters' names to `loaded`."""
        halves: dict[str, dict[str, torch.Tensor]] = {}  # MXFP4 matrix -> its blocks and scales seen so far
        for name, tensor in weights:
            if _EXPERTS not in name:
                yield name, tensor
                continue
            if not self._on_this_stage(name):
                continue
            base, _, part = name.rpartition("_")
            if part in ("blocks", "scales"):
                pair = halves.setdefault(base, {})
                pair[part] = tensor
                if len(pair) == 2:
                    del halves[base]
                    loaded |= self._load_experts(params, base, pair["blocks"], pair["scales"])
            else:
                loaded |= self._load_experts(params, name, tensor)
        if halves:
            raise ValueError(f"MXFP4 tensors without their blocks or scales: {sorted(halves)}")

    @staticmethod
    def _load_experts(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
                      mxfp4_scales: torch.Tensor | None = None) -> set[str]:
        """Loads checkpoint tensor `name`, all experts of one layer's projection or bias, into FusedMoE's
        parameters (returning their names): a 16-bit matrix [E, in, out], a bias [E, out], or, with
        `mxfp4_scales` [E, out, in / 32], MXFP4 codes [E, out, in / 32, 16], expert by expert (a memory-mapped
        checkpoint's pages of another rank's experts stay untouched)."""
        prefix, _, projection = name.rpartition(".")
        kind = "bias" if projection.endswith("_bias") else "weight"
        target = f"{prefix}.{'w2' if projection.startswith('down_proj') else 'w13'}_{kind}"
        if mxfp4_scales is not None:
            stacks = ((target, tensor.flatten(-2)), (f"{target}_scale", mxfp4_scales))
        else:
            stacks = ((target, tensor if kind == "bias" else tensor.transpose(1, 2)),)
        for target_name, stack in stacks:
            param = LlamaForCausalLM._param(params, target_name, name)
            for expert_id, rows in enumerate(stack):  # rows: [out, ...] or [out]
                if projection.startswith("down_proj"):
                    param.weight_loader(param, rows, "w2", expert_id)
                else:  # gate and up interleaved: even rows gate, odd rows up
                    param.weight_loader(param, rows[0::2], "w1", expert_id)
                    param.weight_loader(param, rows[1::2], "w3", expert_id)
        return {target_name for target_name, _ in stacks}
