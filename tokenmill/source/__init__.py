"""Where a model comes from: finding it (the embedded default, a local directory, a GGUF file, a hub id),
its HF config, its tokenizer and its end-of-sequence ids.

Torch-free, as the frontend needs all of this: transformers and huggingface_hub are imported only when
a config or tokenizer is actually read. The weights are loader/'s job, in the engine core.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from tokenmill.source.default_model import DEFAULT_MODEL_GENERATION_CONFIG, DEFAULT_MODEL_NAME, default_model_path

logger = logging.getLogger(__name__)

# The sampling fields a generation config may set defaults for (HF names), and HF's own defaults for them: a
# file that sets a field to HF's default sets nothing (as transformers' GenerationConfig.to_diff_dict reads it).
_GENERATION_FIELDS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": None, "repetition_penalty": 1.0,
                      "max_new_tokens": None}


@dataclass
class ModelSource:
    name: str  # what the user asked for (a served name's default)
    path: str  # local directory, or the .gguf file
    format: str  # "safetensors" | "pt" (PyTorch pickles only) | "gguf"
    hf_config: Any
    is_default_model: bool = False

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"


def sampling_defaults(source: ModelSource, generation_config: str = "auto",
                      override: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SamplingParams defaults the model's authors recommend, as vLLM takes them: from the model's
    generation_config.json ("auto"; for the embedded model, DEFAULT_MODEL_GENERATION_CONFIG), from the one
    in a folder (a path), or none ("vllm"); then `override`. Only temperature, top_p, top_k, min_p,
    repetition_penalty and max_new_tokens (as max_tokens) count. A request's own values always win."""
    if generation_config == "vllm":
        found: dict[str, Any] = {}
    elif generation_config == "auto":
        found = (dict(DEFAULT_MODEL_GENERATION_CONFIG) if source.is_default_model
                 else _read_generation_config(source.path) if os.path.isdir(source.path) else {})
    elif os.path.isdir(generation_config):
        found = _read_generation_config(generation_config)
    else:
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder holding generation_config.json, "
                         f"got {generation_config!r}")
    found.update(override or {})
    defaults = {name: value for name, value in found.items()
                if name in _GENERATION_FIELDS and value is not None and value != _GENERATION_FIELDS[name]}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults


def log_sampling_defaults(defaults: dict[str, Any]) -> None:
    if defaults:
        logger.info("default sampling parameters from the model's generation config: %s (a request's own values "
                    "win; --generation-config vllm ignores the model's)", defaults)


def _read_generation_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def resolve_model(model: str | None, revision: str | None = None) -> ModelSource:
    if model in (None, "", "default"):
        source = _gguf_source(DEFAULT_MODEL_NAME, default_model_path())
        source.is_default_model = True
        return source
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"model file {model!r} is not a .gguf file; pass a HF-format directory or a .gguf")
        return _gguf_source(model, model)
    if os.path.isdir(model):
        if os.path.exists(os.path.join(model, "config.json")):
            return _hf_dir_source(model, model)
        from tokenmill.source.gguf_file import find_gguf_file

        gguf_file = find_gguf_file(model)
        if gguf_file is None:
            raise ValueError(f"directory {model!r} has neither config.json nor a .gguf file")
        return _gguf_source(model, gguf_file)
    if model.count("/") > 1 or model.startswith((".", "/")):
        raise FileNotFoundError(f"model path {model!r} does not exist")
    from tokenmill.source.hub import download_model

    return _hf_dir_source(model, download_model(model, revision))


def _hf_dir_source(name: str, path: str) -> ModelSource:
    from transformers import AutoConfig

    return ModelSource(name, path, checkpoint_format(path), AutoConfig.from_pretrained(path))


def checkpoint_format(path: str) -> str:
    """"pt" for a directory whose weights are PyTorch pickles only (.bin / .pt), else "safetensors"."""
    names = os.listdir(path)
    if any(name.endswith(".safetensors") for name in names):
        return "safetensors"
    return "pt" if any(name.endswith((".bin", ".pt")) for name in names) else "safetensors"


def _gguf_source(name: str, path: str) -> ModelSource:
    from tokenmill.source.gguf_file import load_gguf_config

    return ModelSource(name, path, "gguf", load_gguf_config(path))


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any:
    """The HF tokenizer. A GGUF file's comes from its converted cache without AutoTokenizer, whose import
    brings in torch (over a second of start-up in a frontend that otherwise never needs it)."""
    if tokenizer is None and source.is_gguf:
        from tokenmill.source.gguf_file import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer or source.path)


def eos_token_ids(source: ModelSource, tokenizer: Any | None) -> set[int]:
    """The model's end-of-sequence ids: from its config (may be a list) and its tokenizer."""
    ids: set[int] = set()
    eos = getattr(source.hf_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
