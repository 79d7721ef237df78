"""Where a model comes from: finding it (the embedded default, a local directory, a GGUF file, a hub id),
its HF config, its tokenizer and its end-of-sequence ids.

Torch-free, as the frontend needs all of this: transformers and huggingface_hub are imported only when
a config or tokenizer is actually read. The weights are loader/'s job, in the engine core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tokenmill.source.default_model import DEFAULT_MODEL_NAME, default_model_path


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

    return ModelSource(name, path, "safetensors", AutoConfig.from_pretrained(path))


def _gguf_source(name: str, path: str) -> ModelSource:
    from tokenmill.source.gguf_file import load_gguf_config

    return ModelSource(name, path, "gguf", load_gguf_config(path))


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    if source.is_gguf:
        from tokenmill.source.gguf_file import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    return AutoTokenizer.from_pretrained(source.path)


def eos_token_ids(source: ModelSource, tokenizer: Any | None) -> set[int]:
    """The model's end-of-sequence ids: from its config (may be a list) and its tokenizer."""
    ids: set[int] = set()
    eos = getattr(source.hf_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
