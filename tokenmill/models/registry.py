"""Architecture name (HF `config.architectures[0]`) -> model class, imported only when a model is built.

Adding an architecture is a new module under models/ and one line in _MODELS.
"""

from __future__ import annotations

import importlib
from typing import Any

# architecture -> (module under tokenmill.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v2", "DeepseekV3ForCausalLM"),
    "GptOssForCausalLM": ("gpt_oss", "GptOssForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# A config with no `architectures` is matched by its model_type.
_BY_MODEL_TYPE = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                  "gpt_oss": "GptOssForCausalLM",
                  "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(sorted(_MODELS))


def resolve_architecture(config: Any) -> str:
    """The supported architecture a HF config names; ValueError listing the supported ones if none."""
    names = list(getattr(config, "architectures", None) or [])
    if not names and getattr(config, "model_type", None) in _BY_MODEL_TYPE:
        names = [_BY_MODEL_TYPE[config.model_type]]
    for name in names:
        if name in _MODELS:
            return name
    raise ValueError(f"model architecture {names or getattr(config, 'model_type', None)} is not supported; "
                     f"supported: {list(SUPPORTED_ARCHITECTURES)}")


def resolve_model_class(config: Any) -> type:
    module, class_name = _MODELS[resolve_architecture(config)]
    return getattr(importlib.import_module(f"tokenmill.models.{module}"), class_name)
