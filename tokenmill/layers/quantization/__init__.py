"""Weight formats: the checkpoint's `quantization_config` (or `quantization=...`) names one of these.

Adding a format is a new module with a QuantizationConfig subclass and one line in QUANTIZATION_METHODS.
Without one, every linear layer runs UnquantizedLinearMethod (layers/linear.py).
"""

from __future__ import annotations

from typing import Any

from tokenmill.layers.quantization.awq import AWQConfig
from tokenmill.layers.quantization.base import LinearMethod, MoEMethod, QuantizationConfig
from tokenmill.layers.quantization.compressed_tensors import CompressedTensorsConfig
from tokenmill.layers.quantization.fp8 import Fp8Config
from tokenmill.layers.quantization.gguf import GGUFQuantConfig
from tokenmill.layers.quantization.gptq import GPTQConfig
from tokenmill.layers.quantization.mxfp4 import Mxfp4Config

# method name (as `quantization_config["quant_method"]` and `quantization=` spell it) -> its QuantizationConfig
QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {
    "fp8": Fp8Config,
    "compressed-tensors": CompressedTensorsConfig,
    "awq": AWQConfig,
    "gptq": GPTQConfig,
    "mxfp4": Mxfp4Config,
}
# Methods that quantize a 16-bit checkpoint as it loads.
ONLINE_METHODS = {"fp8": Fp8Config.online}

__all__ = ["QUANTIZATION_METHODS", "LinearMethod", "MoEMethod", "QuantizationConfig", "get_quantization_config"]


def get_quantization_config(hf_config: Any, quantization: str | None = None) -> QuantizationConfig | None:
    """The weight format: the checkpoint's (its `quantization_config`), which `quantization` may name but not
    contradict; for a 16-bit checkpoint, `quantization` quantizes it at load (fp8); for a GGUF file, "gguf"
    keeps its quantized tensors as they are. None: plain weights."""
    from tokenmill.source.gguf_file import GGUFConfig

    if quantization == "gguf" or isinstance(hf_config, GGUFConfig):
        if not isinstance(hf_config, GGUFConfig):
            raise ValueError("quantization='gguf' keeps a GGUF file's weights quantized, and this model is not a "
                             "GGUF file")
        if quantization not in (None, "gguf"):
            raise ValueError(f"quantization={quantization!r} does not apply to a GGUF file (it may be 'gguf', "
                             "which keeps its weights quantized, or unset, which dequantizes them)")
        return GGUFQuantConfig() if quantization == "gguf" else None
    declared = getattr(hf_config, "quantization_config", None)
    if declared:
        declared = declared if isinstance(declared, dict) else declared.to_dict()
        method = declared.get("quant_method")
        if method not in QUANTIZATION_METHODS:
            raise ValueError(f"the checkpoint's quantization_config names quant_method {method!r}, which tokenmill "
                             f"does not support (supported: {', '.join(sorted(QUANTIZATION_METHODS))})")
        if quantization is not None and quantization != method:
            raise ValueError(f"quantization={quantization!r}, but the checkpoint is quantized with {method!r}")
        return QUANTIZATION_METHODS[method].from_config(declared)
    if quantization is None:
        return None
    if quantization not in ONLINE_METHODS:
        known = sorted(set(QUANTIZATION_METHODS) | set(ONLINE_METHODS) | {"gguf"})
        raise ValueError(f"quantization={quantization!r} needs a checkpoint quantized so, and this one is not "
                         f"(known methods: {', '.join(known)}; on a 16-bit checkpoint: {', '.join(ONLINE_METHODS)})")
    return ONLINE_METHODS[quantization]()
