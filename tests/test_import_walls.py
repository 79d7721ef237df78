"""The walls between rooms hold at import time: the frontend (entrypoints, the engine's frontend half, the
package's top level) and the scheduler's room (core/) load in a fresh interpreter without torch and without
the worker, model, layer or attention code. Only building an engine core brings those in."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import tokenmill.core
import tokenmill.entrypoints

FRONTEND_ENGINE = ["tokenmill.engine.async_llm", "tokenmill.engine.llm_engine", "tokenmill.engine.core_client",
                   "tokenmill.engine.processor", "tokenmill.engine.output_processor", "tokenmill.engine.detokenizer"]
FORBIDDEN = ("torch", "tokenmill.worker", "tokenmill.models", "tokenmill.layers", "tokenmill.attention")


def modules_of(package) -> list[str]:
    """Every module under the package, but `__main__`s (importing one runs it)."""
    return [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
            if not info.name.endswith(".__main__")]


def loaded_after_importing(modules: list[str], code: str = "") -> list[str]:
    script = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n{code}\n"
              "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def forbidden(loaded: list[str]) -> list[str]:
    return [m for m in loaded if m in FORBIDDEN or m.startswith(tuple(f"{name}." for name in FORBIDDEN))]


def test_frontend_and_core_load_without_torch_or_engine_internals():
    modules = ["tokenmill", *modules_of(tokenmill.entrypoints), *FRONTEND_ENGINE, *modules_of(tokenmill.core),
               "tokenmill.config", "tokenmill.sampling_params", "tokenmill.outputs", "tokenmill.source",
               "tokenmill.source.gguf_file", "tokenmill.structured.grammar",
               "tokenmill.spec_decode.config", "tokenmill.spec_decode.ngram", "tokenmill.spec_decode.metrics"]
    # the package's lazy names, and the CLI with every subcommand's parser built
    code = ("from tokenmill import LLM, SamplingParams, RequestOutput\n"
            "from tokenmill.entrypoints.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    loaded = loaded_after_importing(modules, code)
    assert "tokenmill.entrypoints.openai.api_server" in loaded and "tokenmill.core.scheduler" in loaded
    assert forbidden(loaded) == []


def test_the_check_sees_a_breach():
    assert forbidden(loaded_after_importing(["tokenmill.worker.worker"])) != []


def test_a_cpu_engine_does_not_import_triton():
    """Triton is the GPU's: importing it costs a CPU start-up a sixth of a second (and prints nanobind's leak
    report at exit)."""
    loaded = loaded_after_importing(["tokenmill.worker.worker", "tokenmill.models.llama", "tokenmill.models.qwen3_moe",
                                     "tokenmill.models.mixtral", "tokenmill.loader.gguf",
                                     "tokenmill.loader.safetensors", "tokenmill.layers.quantization"])
    assert "triton" not in loaded
