"""Load formats -> weight loaders, imported only when used (the config validates names without torch).

Adding a format is a new module with a WeightLoader subclass (loader/base.py) and one line in _LOADERS.
"""

from __future__ import annotations

import importlib

# load format -> (module under tokenmill.loader, class name)
_LOADERS: dict[str, tuple[str, str]] = {
    "safetensors": ("safetensors", "SafetensorsLoader"),
    "pt": ("pt", "PtLoader"),
    "gguf": ("gguf", "GGUFLoader"),
    "dummy": ("dummy", "DummyLoader"),
}
# "auto": the format the model's files are in (ModelSource.format).
LOAD_FORMATS = ("auto", *_LOADERS)


def loader_class(load_format: str) -> type:
    module, class_name = _LOADERS[load_format]
    return getattr(importlib.import_module(f"tokenmill.loader.{module}"), class_name)
