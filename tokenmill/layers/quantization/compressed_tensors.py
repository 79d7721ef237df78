"""compressed-tensors checkpoints (llm-compressor's format): the FP8 schemes, W8A8 with e4m3 weights scaled per
tensor or per channel and activations scaled per token (dynamic) or per tensor (static `input_scale`).

    "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "dynamic": false, ...},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": true, ...}}},
      "ignore": ["lm_head"], "kv_cache_scheme": null | {"type": "float", "num_bits": 8, "strategy": "tensor"}}

The weights run through fp8.py's Fp8LinearMethod, a MoE layer's experts through fp8_moe.py's Fp8MoEMethod.
Other schemes (integer, 4-bit, weight-only) are refused at start-up, naming the scheme.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenmill.layers.quantization.base import LinearMethod, MoEMethod, QuantizationConfig
from tokenmill.layers.quantization.fp8 import Fp8LinearMethod, is_ignored


def _describe(scheme: dict[str, Any] | None) -> str:
    if not scheme:
        return "none"
    return f"{scheme.get('type')} {scheme.get('num_bits')}-bit {scheme.get('strategy')} " \
           f"{'dynamic' if scheme.get('dynamic') else 'static'}"


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, weight_strategy: str, static_input: bool, ignored: list[str]) -> None:
        self.weight_strategy, self.static_input, self.ignored = weight_strategy, static_input, ignored

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        groups = list((config.get("config_groups") or {}).values())
        if len(groups) != 1 or "Linear" not in (groups[0].get("targets") or []):
            raise ValueError("compressed-tensors: tokenmill reads one config group targeting Linear layers; this "
                             f"checkpoint has {len(groups)} ({[g.get('targets') for g in groups]})")
        weights, activations = groups[0].get("weights") or {}, groups[0].get("input_activations")
        fp8_weights = (weights.get("type") == "float" and weights.get("num_bits") == 8 and not weights.get("dynamic")
                       and weights.get("strategy") in ("tensor", "channel") and weights.get("symmetric", True))
        fp8_inputs = (activations is not None and activations.get("type") == "float"
                      and activations.get("num_bits") == 8 and activations.get("strategy") in ("tensor", "token")
                      and (activations.get("dynamic") or activations.get("strategy") == "tensor"))
        if not (fp8_weights and fp8_inputs):
            raise ValueError(f"compressed-tensors scheme with weights {_describe(weights)} and input activations "
                             f"{_describe(activations)} is not supported; supported: FP8 (float 8-bit) weights per "
                             "tensor or channel with FP8 activations per token (dynamic) or per tensor")
        return cls(weights["strategy"], not activations.get("dynamic"), list(config.get("ignore") or []))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        from tokenmill.layers.linear import UnquantizedLinearMethod

        if is_ignored(prefix, self.ignored):
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(True, self.weight_strategy, self.static_input)

    def get_moe_method(self, layer: nn.Module, prefix: str) -> MoEMethod:
        from tokenmill.layers.fused_moe import UnquantizedMoEMethod
        from tokenmill.layers.quantization.fp8_moe import Fp8MoEMethod

        if is_ignored(prefix, self.ignored):
            return UnquantizedMoEMethod()
        return Fp8MoEMethod(True, self.weight_strategy, self.static_input)
