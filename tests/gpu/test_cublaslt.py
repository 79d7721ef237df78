"""On a CUDA GPU: the cuBLASLt binding and the tuned-GEMM plans against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers import cublaslt
from tokenmill.layers.linear import linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = ((1024, 512), (384, 1024))  # (N, K) of x [M, K] @ w [N, K].T
SIZES = (2, 8, 24, 64)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    yield {(n, k): [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5
                    for _ in range(3)] for n, k in SHAPES}
    cublaslt.clear_plans()


def test_every_offered_algorithm_matches_reference(weights):
    for (n, k), ws in weights.items():
        for m in SIZES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ ws[1].double().T
            lt = cublaslt.LtMatmul(m, n, k, torch.bfloat16)
            algos = lt.heuristics(8) + lt.heuristics(8, workspace_bytes=0)
            assert algos, f"no algorithm for M={m} N={n} K={k}"
            for algo in algos:
                out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                assert rel_err(lt.run(x, ws[1], out, algo), ref) < 1e-2, cublaslt.algo_config(algo)


def test_tuned_linear_matches_reference_in_a_cuda_graph(weights):
    cublaslt.tune(weights, list(SIZES), reps=2)
    (n, k), ws = next(iter(weights.items()))
    m = SIZES[-1]
    lt = cublaslt.LtMatmul(m, n, k, torch.bfloat16)
    # Whatever the timings chose, force a plan for this size so the routing through linear() is tested.
    cublaslt._plans[(m, n, k, torch.bfloat16)] = cublaslt.Plan(lt, lt.heuristics(8)[-1])
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert cublaslt.plan_for(x, ws[0]) is not None
    assert cublaslt.plan_for(torch.randn(k, m, device="cuda", dtype=torch.bfloat16).T, ws[0]) is None  # strided
    linear(x, ws[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, ws[0])
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(out, x.double() @ ws[0].double().T) < 1e-2
    for (n, k), ws in weights.items():  # every size, planned or not
        for m in SIZES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            assert rel_err(linear(x, ws[2]), x.double() @ ws[2].double().T) < 1e-2


def test_prefill_sizes_run_the_nearest_tuned_size_algorithm(weights):
    (n, k), ws = next(iter(weights.items()))
    cublaslt.tune({(n, k): ws}, [1024, 2048], reps=2, screen=False, buckets=True)
    # Whatever the timings chose, 1024 rows won with the heuristic's last pick and 2048 with F.linear.
    lt = cublaslt.LtMatmul(1024, n, k, torch.bfloat16)
    algo = lt.heuristics(8)[-1]
    cublaslt._plans[(1024, n, k, torch.bfloat16)] = cublaslt.Plan(lt, algo)
    cublaslt._plans.pop((2048, n, k, torch.bfloat16), None)
    cublaslt._buckets[(n, k, torch.bfloat16)] = [(1024, algo), (2048, None)]
    cublaslt._sized.clear()

    def planned(m: int) -> cublaslt.Plan | None:
        return cublaslt.plan_for(torch.empty(m, k, device="cuda", dtype=torch.bfloat16), ws[0])

    for m in (740, 1000, 1300, 1440):  # nearest 1024, within a factor of sqrt 2
        plan = planned(m)
        assert plan is not None and plan.lt.m == m and bytes(plan.algo) == bytes(algo)
    assert planned(1024).lt.m == 1024
    for m in (700, 1460, 2048, 2500):  # too far from 1024, or nearest 2048, where F.linear won
        assert planned(m) is None
    for m in (1000, 1300):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert rel_err(linear(x, ws[1]), x.double() @ ws[1].double().T) < 1e-2
    for i in range(cublaslt.SIZED_PLANS + 1):  # the derived plans are bounded
        planned(800 + i)
    assert len(cublaslt._sized) == cublaslt.SIZED_PLANS
