"""Weight formats: the checkpoint's `quantization_config` (or `quantization=...`) names one of these.

Adding a format is a new module with a QuantizationConfig subclass and one line in QUANTIZATION_METHODS.
Without one, every linear layer runs UnquantizedLinearMethod (layers/linear.py).
"""

from __future__ import annotations

from typing import Any

from tokenmill.layers.quantization.base import LinearMethod, QuantizationConfig

# method name (as `quantization_config["quant_method"]` spells it) -> its QuantizationConfig class
QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {}

__all__ = ["QUANTIZATION_METHODS", "LinearMethod", "QuantizationConfig", "get_quantization_config"]


def get_quantization_config(hf_config: Any) -> QuantizationConfig | None:
    """The weight format a HF config declares, or None for plain floating-point weights."""
    declared = getattr(hf_config, "quantization_config", None)
    if not declared:
        return None
    declared = declared if isinstance(declared, dict) else declared.to_dict()
    method = declared.get("quant_method")
    if method not in QUANTIZATION_METHODS:
        supported = ", ".join(sorted(QUANTIZATION_METHODS)) or "none yet"
        raise ValueError(f"the checkpoint's quantization_config names quant_method {method!r}, which tokenmill does "
                         f"not support (supported: {supported})")
    return QUANTIZATION_METHODS[method].from_config(declared)
