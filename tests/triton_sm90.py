"""Every tokenmill Triton kernel variant the CPU tests launch, compiled for a Hopper GPU (sm_90) when the run ends.

The CPU tests run kernels in Triton's interpreter, which accepts what the GPU compiler refuses (a tensor-core dot
over a tile too small or of mixed dtypes, branches returning different types). Triton's compiler itself runs on
the CPU down to the cubin, so with TOKENMILL_SM90_COMPILE=1 (`make test` sets it) tests/conftest.py records each
launch's argument types and constexprs here, and at the end of the session compiles every variant seen in a
process without the interpreter; one that does not compile fails the run, naming the kernel and the variant.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
import tempfile

import torch

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                  torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5", torch.uint8: "u8", torch.int8: "i8",
                  torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
_specs: dict[str, dict] = {}
_unrecorded: set[str] = set()


def _type_of(value) -> str | None:
    """Triton's signature type of a runtime argument; None for one that becomes a constexpr (None)."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return None
    raise TypeError(f"argument of type {type(value).__name__}")


def _is_constexpr(annotation) -> bool:
    return annotation == "tl.constexpr" or getattr(annotation, "__name__", "") == "constexpr"


def _constexpr_value(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"constexpr of type {type(value).__name__}")


@functools.cache
def _parameters(fn) -> dict:
    return dict(inspect.signature(fn).parameters)


def _record(kernel, args: tuple, kwargs: dict) -> None:
    fn = kernel.fn
    if not fn.__module__.startswith("tokenmill."):  # tests' own kernels are not importable by module name
        return
    name = f"{fn.__module__}.{fn.__name__}"
    try:
        parameters = _parameters(fn)
        bound = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
        signature, constexprs = {}, {}
        for arg, parameter in parameters.items():
            value = bound.get(arg, parameter.default)
            if _is_constexpr(parameter.annotation):
                constexprs[arg] = _constexpr_value(value)
                signature[arg] = "constexpr"
            elif (kind := _type_of(value)) is None:
                constexprs[arg], signature[arg] = None, "constexpr"
            else:
                signature[arg] = kind
    except (TypeError, KeyError) as error:
        _unrecorded.add(f"{name}: {error}")
        return
    spec = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}}
    _specs[json.dumps(spec, sort_keys=True)] = spec


def start_recording() -> None:
    """Notes every interpreted kernel launch from now on."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        _record(self, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


_COMPILE = """
import importlib, json, sys
from concurrent.futures import ProcessPoolExecutor

def compile_one(spec):
    import triton
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    try:
        triton.compile(tc.ASTSource(fn=kernel, signature=spec["signature"], constexprs=spec["constexprs"]),
                       target=GPUTarget("cuda", 90, 32), options=spec["options"])
    except Exception as error:
        return f"{spec['module']}.{spec['kernel']} {spec['constexprs']} {spec['signature']}: " \\
            + str(error).strip().splitlines()[-1][:500]
    return None

if __name__ == "__main__":
    specs = json.load(open(sys.argv[1]))
    with ProcessPoolExecutor(2) as pool:
        failures = [f for f in pool.map(compile_one, specs) if f]
    print(json.dumps(failures))
"""


def compile_specs(specs: list[dict]) -> list[str]:
    """Compiles each spec (module, kernel, signature, constexprs, options) for sm_90 in a process without the
    interpreter; the failures, each naming its kernel and variant."""
    if not specs:
        return []
    with tempfile.TemporaryDirectory() as folder:
        specs_path, script = os.path.join(folder, "specs.json"), os.path.join(folder, "compile_sm90.py")
        with open(specs_path, "w") as f:
            json.dump(specs, f)
        with open(script, "w") as f:
            f.write(_COMPILE)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
        result = subprocess.run([sys.executable, script, specs_path], env=env, capture_output=True, text=True,
                                timeout=1800)
    if result.returncode != 0:
        return [f"the compiling process failed: {result.stderr[-2000:]}"]
    return json.loads(result.stdout.strip().splitlines()[-1])


def compile_recorded() -> tuple[int, list[str]]:
    """Compiles every recorded variant for sm_90: (variants compiled, failures, each naming its kernel)."""
    return len(_specs), compile_specs(list(_specs.values())) + sorted(f"not recorded: {u}" for u in _unrecorded)
