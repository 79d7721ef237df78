"""Start-up work on the GPU that keeps serving steady: the GEMM tuning before the KV cache is sized, and
the warm-up steps after the CUDA graphs are captured.

- tune_gemms: times cuBLASLt's algorithms against F.linear for the products the CUDA graphs will run
  (every graph size, every weight shape) and for a full prefill chunk, then hands each linear layer the
  plans of its weight shape (layers/cublaslt.py). TOKENMILL_GEMM_TUNING=0 turns it off.
- warm_up: runs once each kernel variant that serving may launch and start-up has not (the graphs cover
  decode), so that none is compiled in the middle of serving, where a Triton compile stalls every request
  for about a second.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from tokenmill.forward_context import set_forward_context
from tokenmill.layers import cublaslt
from tokenmill.layers.linear import UnquantizedLinearMethod
from tokenmill.layers.sampler import SamplingMetadata
from tokenmill.worker.step_inputs import made_up_metadata

if TYPE_CHECKING:
    from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# The cached prefix of warm_up's long-prefix steps: long enough that a short step over it splits its keys.
WARM_UP_PREFIX = 4096


def tunable_layers(model: nn.Module) -> dict[tuple[int, int], list[nn.Module]]:
    """The layers whose product is a plain x @ W.T without a bias (what cublaslt.tune plans), by weight
    shape (N, K)."""
    layers: dict[tuple[int, int], list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(getattr(module, "linear_method", None), UnquantizedLinearMethod) \
                and getattr(module, "bias", None) is None:
            layers.setdefault(tuple(module.weight.shape), []).append(module)
    return layers


@torch.inference_mode()
def tune_gemms(runner: ModelRunner) -> None:
    """Plans for every CUDA-graph size and for a full prefill chunk (max_num_batched_tokens rows, the layers'
    weights, not the LM head's), given to each layer's linear method. Before the KV cache is sized, so its
    scratch memory is free again by then."""
    if not runner.graphs.sizes or os.environ.get("TOKENMILL_GEMM_TUNING", "1") == "0":
        return
    layers = tunable_layers(runner.model)
    lm_head = runner.model.lm_head
    weights = {shape: [m.weight for m in modules] for shape, modules in layers.items()}
    body = {shape: [m.weight for m in modules if m is not lm_head] for shape, modules in layers.items()}
    plans: cublaslt.GemmPlans = {}
    try:
        cublaslt.tune(weights, [s for s in runner.graphs.sizes + runner.mixed_graphs.sizes if s > 1], plans)
        cublaslt.tune({shape: w for shape, w in body.items() if w}, [runner.max_num_tokens], plans, reps=3,
                      screen=False)
    except (RuntimeError, OSError) as e:  # no usable cuBLASLt: every product stays on F.linear
        plans.clear()
        logger.warning("GEMM tuning skipped: %s", e)
    for shape, modules in layers.items():
        shared = plans.get(shape, {})
        for module in modules:
            module.linear_method.gemm_plans = shared
    torch.cuda.empty_cache()


def warm_up_steps(max_num_tokens: int, max_model_len: int, max_num_reqs: int, block_size: int
                  ) -> list[tuple[list[int], list[int]]]:
    """(q_lens, seq_lens) of the made-up steps: at each power-of-two query length, one request over a short
    and over a long (WARM_UP_PREFIX) cached prefix, and as many as a step holds after a one-token request;
    then one fresh prompt as long as a step allows. No sequence is longer than max_model_len."""
    steps: list[tuple[list[int], list[int]]] = []
    q = 2
    while q <= min(max_num_tokens, max_model_len):
        steps.append(([q], [min(max_model_len, q + block_size)]))
        steps.append(([q], [min(max_model_len, q + WARM_UP_PREFIX)]))
        n = min(max_num_reqs - 1, (max_num_tokens - 1) // q)
        if n > 0:
            seq_lens = [min(max_model_len, WARM_UP_PREFIX)] + [min(max_model_len, q + block_size)] * n
            steps.append(([1] + [q] * n, seq_lens))
        q *= 2
    longest = min(max_num_tokens, max_model_len)
    steps.append(([longest], [longest]))
    return steps


@torch.inference_mode()
def warm_up(runner: ModelRunner) -> float:
    """Runs warm_up_steps, each with only the logits rows in the last layer as in a real step, then the
    sampler with no filters. Needs the KV cache: reads its block 0, writes nothing (every slot is -1).
    Returns seconds taken."""
    started = time.perf_counter()
    device = runner.device
    steps = warm_up_steps(runner.max_num_tokens, runner.max_model_len, runner.max_num_reqs, runner.block_size)
    for q_lens, seq_lens in steps:
        num_tokens, num_reqs = sum(q_lens), len(q_lens)
        block_table = torch.zeros(num_reqs, runner.max_blocks_per_req, dtype=torch.int32)
        metadata, positions = made_up_metadata(q_lens, seq_lens, block_table,
                                               torch.full((num_tokens,), -1, dtype=torch.int64),
                                               runner.max_model_len, device)
        logits_rows = metadata.query_start_loc[1:].long() - 1
        logits_metadata = runner.inputs.logits_metadata(
            metadata, torch.arange(num_reqs, dtype=torch.int32, device=device))
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        with set_forward_context(metadata, runner.backend, logits_rows, logits_metadata):
            hidden_states = runner.model(input_ids, positions)
    logits = runner.model.compute_logits(hidden_states)
    runner.sampler(logits, SamplingMetadata(temperature=torch.ones(len(logits), device=device), top_p=None,
                                            top_k=None, min_p=None, all_greedy=False))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started
