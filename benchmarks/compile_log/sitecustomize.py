"""Logs every Triton kernel compiled in this process (name, constexprs, seconds) to stderr, to find the
variants a run compiles after start-up. Put this folder first on PYTHONPATH:

    PYTHONPATH=benchmarks/compile_log:$PYTHONPATH python3 -m tokenmill.entrypoints.cli bench throughput ...

A compile that finds its binary in Triton's on-disk cache takes milliseconds; a real one, about a second.
"""

import sys
import time

try:
    from triton.runtime.jit import JITFunction
except ImportError:  # no Triton: nothing to log
    JITFunction = None

if JITFunction is not None and hasattr(JITFunction, "_do_compile"):
    _compile = JITFunction._do_compile

    def _logged_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        started = time.perf_counter()
        kernel = _compile(self, key, signature, device, constexprs, options, attrs, warmup)
        seconds = time.perf_counter() - started
        consts = {k[0] if isinstance(k, tuple) else k: v for k, v in dict(constexprs).items()}
        stamp = time.strftime("%H:%M:%S") + f",{int(time.time() * 1000) % 1000:03d}"
        print(f"TRITON-COMPILE {stamp} {seconds:6.3f}s {self._fn_name} {consts} "
              f"warps={getattr(options, 'num_warps', '?')} stages={getattr(options, 'num_stages', '?')}",
              file=sys.stderr, flush=True)
        return kernel

    JITFunction._do_compile = _logged_compile
elif JITFunction is not None:
    print("TRITON-COMPILE: this Triton has no JITFunction._do_compile; nothing is logged", file=sys.stderr)
