"""Architecture name (HF `config.architectures[0]`) -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.qwen2 import Qwen2ForCausalLM
from tokenmill.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


def resolve_model_class(config: Any) -> type[nn.Module]:
    names = list(getattr(config, "architectures", None) or [])
    if not names and getattr(config, "model_type", None) in _BY_MODEL_TYPE:
        names = [_BY_MODEL_TYPE[config.model_type]]
    for name in names:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(f"model architecture {names or getattr(config, 'model_type', None)} is not supported; "
                     f"supported: {sorted(MODEL_REGISTRY)}")
