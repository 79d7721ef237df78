"""Decode-sized GEMMs through cuBLASLt with a measured algorithm instead of cuBLAS's first guess.

F.linear runs the first algorithm cuBLAS's heuristic picks. For the few-row products of a decode step
(M = batch rows; the time is the weight streaming from memory) that pick is often not the fastest one
cuBLASLt offers: on an H100, Llama-3.1-8B's down_proj at M = 128 takes 54 us with it and 45 us with
another algorithm. So before the CUDA graphs are captured, `tune` times,
for every graph size and every distinct weight shape, F.linear against a shortlist of cuBLASLt
algorithms, inside CUDA graphs over several layers' weights (cold in L2, as in a decode step), and
keeps a plan wherever an algorithm wins by more than the noise. The plans are returned by weight shape;
the worker hands each linear layer those of its shape, and `layers.linear.linear()` runs them.

The binding is a few ctypes calls into the libcublasLt torch has loaded. cuBLAS is column-major, so
y[M, N] = x[M, K] @ w[N, K].T is computed as y.T = w @ x.T: A is w (a K x N column-major matrix,
transposed), B is x (K x M column-major), C and D are y (N x M column-major).
"""

from __future__ import annotations

import ctypes
import logging
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F = 68
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_OP_N, _OP_T = 0, 1
_PREF_MAX_WORKSPACE_BYTES = 1
_CONFIG_TILE_ID, _CONFIG_SPLITK_NUM, _CONFIG_STAGES_ID = 1, 2, 6
WORKSPACE_BYTES = 32 << 20
ALIGNMENT = 256  # bytes: the heuristic's default assumption about every matrix's address

# Tuning: the shapes whose heuristics seed the candidate pool, how many to take from each, the sizes
# at which the pool is screened, how many survive per screening size, and the margin a cuBLASLt
# algorithm must win by (timing noise in a graph is about 1 %).
POOL_SIZES = (8, 16, 32, 64, 128, 192, 256, 512)
POOL_PER_SIZE = 8
SCREEN_SIZES = (16, 64, 128, 256)
SHORTLIST_PER_SIZE = 3
MARGIN = 0.97
ROTATION_BYTES = 256 << 20  # weights cycled through per timing, well above the 50 MB of an H100's L2

_DTYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F}


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lib = None
_handle = None
_workspaces: dict[int, torch.Tensor] = {}


def _library() -> ctypes.CDLL:
    """The libcublasLt torch itself loaded (found through /proc/self/maps after a first matmul)."""
    global _lib, _handle
    if _lib is None:
        torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcublasLt.so" in line}
        if not paths:
            raise RuntimeError("libcublasLt is not loaded in this process")
        lib = ctypes.CDLL(sorted(paths)[0])
        for name in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescSetAttribute",
                     "cublasLtMatrixLayoutCreate", "cublasLtMatmulPreferenceCreate",
                     "cublasLtMatmulPreferenceSetAttribute", "cublasLtMatmulPreferenceDestroy",
                     "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmul", "cublasLtMatmulAlgoConfigGetAttribute",
                     "cublasLtMatmulAlgoCheck"):
            getattr(lib, name).restype = ctypes.c_int
        lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                                   ctypes.c_int64]
        lib.cublasLtMatmul.argtypes = [ctypes.c_void_p] * 13 + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        handle = ctypes.c_void_p()
        _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        _lib, _handle = lib, handle
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def _workspace(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _workspaces:
        _workspaces[index] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[index]


def algo_config(algo: _Algo) -> dict[str, int]:
    """Tile id, split-K and stages id of an algorithm (-1 where cuBLASLt does not say)."""
    lib = _library()
    config = {}
    for key, attr in (("tile", _CONFIG_TILE_ID), ("split_k", _CONFIG_SPLITK_NUM), ("stages", _CONFIG_STAGES_ID)):
        value, written = ctypes.c_uint32(), ctypes.c_size_t()
        status = lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value),
                                                          ctypes.sizeof(value), ctypes.byref(written))
        config[key] = value.value if status == 0 else -1
    return config


class LtMatmul:
    """The descriptors of one (M, N, K, dtype) product; `run` launches it with a given algorithm on the
    current stream, so a CUDA graph captures it like any other kernel."""

    def __init__(self, m: int, n: int, k: int, dtype: torch.dtype) -> None:
        lib = _library()
        self.m, self.n, self.k, self.dtype = m, n, k, dtype
        cuda_type = _DTYPES[dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _CUDA_R_32F), "MatmulDescCreate")
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            value = ctypes.c_int32(op)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
                   "MatmulDescSetAttribute")
        self.a, self.b, self.c = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        for layout, rows, cols in ((self.a, k, n), (self.b, k, m), (self.c, n, m)):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), cuda_type, rows, cols, rows),
                   "MatrixLayoutCreate")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def heuristics(self, count: int, workspace_bytes: int = WORKSPACE_BYTES) -> list[_Algo]:
        """Up to `count` algorithms, in the heuristic's order, that fit the workspace."""
        lib = _library()
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        limit = ctypes.c_uint64(workspace_bytes)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(limit),
                                                        ctypes.sizeof(limit)), "MatmulPreferenceSetAttribute")
        results = (_Heuristic * count)()
        returned = ctypes.c_int()
        status = lib.cublasLtMatmulAlgoGetHeuristic(_handle, self.desc, self.a, self.b, self.c, self.c, pref, count,
                                                    results, ctypes.byref(returned))
        lib.cublasLtMatmulPreferenceDestroy(pref)
        _check(status, "MatmulAlgoGetHeuristic")
        return [results[i].algo for i in range(returned.value) if results[i].state == 0]

    def supports(self, algo: _Algo) -> bool:
        """Whether an algorithm (possibly found for another shape) runs this product within the workspace."""
        result = _Heuristic()
        status = _library().cublasLtMatmulAlgoCheck(_handle, self.desc, self.a, self.b, self.c, self.c,
                                                    ctypes.byref(algo), ctypes.byref(result))
        return status == 0 and result.workspace_size <= WORKSPACE_BYTES

    def run(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, algo: _Algo) -> torch.Tensor:
        workspace = _workspace(x.device)
        _check(_library().cublasLtMatmul(
            _handle, self.desc, ctypes.addressof(self.alpha), weight.data_ptr(), self.a, x.data_ptr(), self.b,
            ctypes.addressof(self.beta), out.data_ptr(), self.c, out.data_ptr(), self.c, ctypes.addressof(algo),
            workspace.data_ptr(), WORKSPACE_BYTES, torch.cuda.current_stream(x.device).cuda_stream), "cublasLtMatmul")
        return out


class Plan:
    """A tuned product: the descriptors and the algorithm that won."""

    def __init__(self, lt: LtMatmul, algo: _Algo) -> None:
        self.lt, self.algo = lt, algo

    def suits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether x [M, K] @ weight [N, K].T is this plan's product with operands laid out as the heuristic
        assumed (row-major, contiguous, aligned)."""
        return (x.shape[0] == self.lt.m and weight.shape[0] == self.lt.n and weight.shape[1] == self.lt.k
                and x.dtype == weight.dtype == self.lt.dtype and x.is_contiguous() and weight.is_contiguous()
                and not x.data_ptr() % ALIGNMENT and not weight.data_ptr() % ALIGNMENT)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        return self.lt.run(x, weight, out, self.algo)


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, captured in a CUDA graph (after a warm-up on a side stream) and replayed;
    the median of `reps` replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def candidate_pool(n: int, k: int, dtype: torch.dtype, sizes=POOL_SIZES) -> list[_Algo]:
    """Distinct algorithms the heuristic offers for this weight at several batch sizes, with and without
    a workspace (an algorithm found for one size often runs, and sometimes wins, at another), in the
    order found: the first is the heuristic's own pick for sizes[0]."""
    pool, seen = [], set()
    for m in sizes:
        lt = LtMatmul(m, n, k, dtype)
        for workspace in (WORKSPACE_BYTES, 0):
            for algo in lt.heuristics(POOL_PER_SIZE, workspace):
                if bytes(algo) not in seen:
                    seen.add(bytes(algo))
                    pool.append(algo)
    return pool


def _rotation(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Enough of the layers' weights of one shape that cycling through them keeps each cold in L2."""
    per_weight = weights[0].numel() * weights[0].element_size()
    return weights[:max(1, min(len(weights), -(-ROTATION_BYTES // per_weight)))]


def _agrees(plan: Plan, x: torch.Tensor, weight: torch.Tensor) -> bool:
    ref = F.linear(x, weight).float()
    got = plan(x, weight).float()
    return bool(((got - ref).abs().max() <= 1e-2 * ref.abs().max().clamp_min(1e-6)).item())


GemmPlans = dict[tuple[int, int], dict[int, Plan]]  # weight shape (N, K) -> row count M -> plan


@torch.inference_mode()
def tune(weights: dict[tuple[int, int], list[torch.Tensor]], sizes: list[int], plans: GemmPlans, reps: int = 5,
         screen: bool = True) -> float:
    """Adds to `plans` those for x [M, K] @ w.T, for every M in `sizes` and every weight shape (N, K) in
    `weights` (all the model's tensors of that shape), where a cuBLASLt algorithm beats F.linear; returns
    seconds taken. With `screen`, each shape's candidate
    pool is screened at a few sizes, and the best few there, with the heuristic's own pick, are timed at
    every size against F.linear; without (a few large sizes, where every timing is long), the
    candidates are the heuristic's own picks for each size."""
    started = time.perf_counter()
    if not weights:  # every layer quantized: nothing for cuBLASLt
        return 0.0
    sizes = sorted(set(sizes))
    gen = torch.Generator(device=next(iter(weights.values()))[0].device).manual_seed(0)
    kept = 0
    for (n, k), tensors in weights.items():
        rotation = _rotation(tensors)
        dtype, device = rotation[0].dtype, rotation[0].device
        if dtype not in _DTYPES:
            continue
        out = torch.empty(sizes[-1], n, dtype=dtype, device=device)

        def timed(lt: LtMatmul, x: torch.Tensor, algo: _Algo, reps: int, out=out, rotation=rotation) -> float:
            o = out[:lt.m]
            return graph_time(lambda: [lt.run(x, w, o, algo) for w in rotation], reps)

        shortlist: dict[bytes, _Algo] = {}
        if screen:
            pool = candidate_pool(n, k, dtype)
            for m in sorted({min(max(s, sizes[0]), sizes[-1]) for s in SCREEN_SIZES}):
                x = torch.randn(m, k, generator=gen, device=device, dtype=dtype)
                lt = LtMatmul(m, n, k, dtype)
                screened = sorted((timed(lt, x, algo, 2), i) for i, algo in enumerate(pool) if lt.supports(algo))
                shortlist.update((bytes(pool[i]), pool[i]) for _, i in screened[:SHORTLIST_PER_SIZE])
        for m in sizes:
            x = torch.randn(m, k, generator=gen, device=device, dtype=dtype)
            lt = LtMatmul(m, n, k, dtype)
            baseline = graph_time(lambda x=x, rotation=rotation: [F.linear(x, w) for w in rotation], reps)
            if screen:
                candidates = lt.heuristics(1) + [a for a in shortlist.values() if lt.supports(a)]
            else:
                candidates = candidate_pool(n, k, dtype, [m])
            best, index = min(((timed(lt, x, a, reps), i) for i, a in enumerate(candidates)), default=(None, None))
            if best is not None and best < MARGIN * baseline:
                plan = Plan(lt, candidates[index])
                if _agrees(plan, x, rotation[0]):
                    plans.setdefault((n, k), {})[m] = plan
                    kept += 1
    seconds = time.perf_counter() - started
    logger.info("GEMM tuning: %d of %d (size, shape) products run a cuBLASLt algorithm faster than F.linear's; "
                "%.1f s", kept, len(sizes) * len(weights), seconds)
    return seconds
