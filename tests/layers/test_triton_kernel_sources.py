"""Every Triton kernel's sources as the GPU compiler reads them. The interpreter (which the CPU tests use) calls
whatever a kernel names; the compiler hashes a kernel with everything it calls first and refuses a plain Python
function. That check needs no GPU, only a process where the interpreter is off."""

import os
import subprocess
import sys

KERNEL_MODULES = [
    "tokenmill.attention.triton_mla",
    "tokenmill.attention.triton_paged",
    "tokenmill.layers.fp8_ops",
    "tokenmill.layers.fused_moe_triton",
    "tokenmill.layers.quantization.block_int8_gpu",
    "tokenmill.layers.quantization.int4_gpu",
    "tokenmill.layers.triton_ops",
]

PROBE = """
import importlib, sys
import triton
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    kernels = [obj for obj in vars(module).values()
               if isinstance(obj, triton.runtime.jit.JITFunction) and obj.__module__ == name]
    for kernel in kernels:
        kernel.cache_key  # walks the kernel and every function it calls, as compilation does
    print(len(kernels))
"""


def test_kernels_call_only_jit_functions():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", PROBE, *KERNEL_MODULES], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(int(count) > 0 for count in result.stdout.split()), result.stdout
