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
    return {(n, k): [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5
                     for _ in range(3)] for n, k in SHAPES}


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
    plans: cublaslt.GemmPlans = {}
    cublaslt.tune(weights, list(SIZES), plans, reps=2)
    (n, k), ws = next(iter(weights.items()))
    m = SIZES[-1]
    lt = cublaslt.LtMatmul(m, n, k, torch.bfloat16)
    # Whatever the timings chose, force a plan for this size so the routing through linear() is tested.
    plans.setdefault((n, k), {})[m] = plan = cublaslt.Plan(lt, lt.heuristics(8)[-1])
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert plan.suits(x, ws[0])
    assert not plan.suits(torch.randn(k, m, device="cuda", dtype=torch.bfloat16).T, ws[0])  # strided
    linear(x, ws[0], gemm_plans=plans[(n, k)])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, ws[0], gemm_plans=plans[(n, k)])
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(out, x.double() @ ws[0].double().T) < 1e-2
    for shape, ws in weights.items():  # every size, planned or not
        for m in SIZES:
            x = torch.randn(m, shape[1], device="cuda", dtype=torch.bfloat16)
            got = linear(x, ws[2], gemm_plans=plans.get(shape))
            assert rel_err(got, x.double() @ ws[2].double().T) < 1e-2
