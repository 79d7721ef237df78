"""Finding a model (default, local dir, GGUF file, hub id), its config, tokenizer and weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmill.loader.default_model import DEFAULT_MODEL_NAME, default_model_path


@dataclass
class ModelSource:
    name: str  # what the user asked for (a served name's default)
    path: str  # local directory, or the .gguf file
    format: str  # "safetensors" | "gguf"
    hf_config: Any

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"


def resolve_model(model: str | None, revision: str | None = None) -> ModelSource:
    if model in (None, "", "default"):
        return _gguf_source(DEFAULT_MODEL_NAME, default_model_path())
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"model file {model!r} is not a .gguf file; pass a HF-format directory or a .gguf")
        return _gguf_source(model, model)
    if os.path.isdir(model):
        if os.path.exists(os.path.join(model, "config.json")):
            return _hf_dir_source(model, model)
        from tokenmill.loader.gguf import find_gguf_file

        gguf_file = find_gguf_file(model)
        if gguf_file is None:
            raise ValueError(f"directory {model!r} has neither config.json nor a .gguf file")
        return _gguf_source(model, gguf_file)
    if model.count("/") > 1 or model.startswith((".", "/")):
        raise FileNotFoundError(f"model path {model!r} does not exist")
    from tokenmill.loader.hub import download_model

    return _hf_dir_source(model, download_model(model, revision))


def _hf_dir_source(name: str, path: str) -> ModelSource:
    from transformers import AutoConfig

    return ModelSource(name, path, "safetensors", AutoConfig.from_pretrained(path))


def _gguf_source(name: str, path: str) -> ModelSource:
    from tokenmill.loader.gguf import load_gguf_config

    return ModelSource(name, path, "gguf", load_gguf_config(path))


def config_dtype(hf_config: Any) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    if source.is_gguf:
        from tokenmill.loader.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    return AutoTokenizer.from_pretrained(source.path)


def load_model(source: ModelSource, load_format: str, dtype: torch.dtype, device: torch.device,
               max_position: int, seed: int = 0) -> nn.Module:
    """Builds the model on `device` in `dtype` and fills its weights."""
    from tokenmill.models.registry import resolve_model_class

    model_cls = resolve_model_class(source.hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(source.hf_config, max_position)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        from tokenmill.loader.dummy import init_dummy_weights

        init_dummy_weights(model, seed)
        return model.eval()
    if source.is_gguf:
        if load_format not in ("auto", "gguf"):
            raise ValueError(f"load_format={load_format!r} cannot read the GGUF file {source.path!r}")
        from tokenmill.loader.gguf import iter_gguf_weights

        weights = iter_gguf_weights(source.path, dtype)
    else:
        if load_format not in ("auto", "safetensors"):
            raise ValueError(f"load_format={load_format!r} cannot read the directory {source.path!r}")
        from tokenmill.loader.safetensors import iter_safetensors_weights

        weights = iter_safetensors_weights(source.path, dtype)
    loaded = model.load_weights(weights)
    missing = sorted(set(dict(model.named_parameters(remove_duplicate=False))) - loaded)
    if missing:
        raise ValueError(f"checkpoint {source.path!r} lacks weights for {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return model.eval()
