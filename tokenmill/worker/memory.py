"""How many KV-cache blocks fit: an explicit byte budget, a CPU default, or a profiled GPU share."""

from __future__ import annotations

import logging

import torch

from tokenmill.config import CacheConfig

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30


def determine_num_blocks(runner, cache: CacheConfig, graph_reserve_bytes: int = 0) -> int:
    """KV blocks for `runner`'s model.

    On GPU: gpu_memory_utilization x total memory is this engine's share; from it go what the engine
    holds outside PyTorch's allocator (measured against the memory in use before it started), the
    peak of a profiling forward pass at max_num_batched_tokens (weights included), minus the CUDA-graph
    reserve; and never more than is free now.
    """
    per_block = runner.kv_bytes_per_block()
    if cache.kv_cache_memory_bytes is not None:
        budget = cache.kv_cache_memory_bytes
    elif runner.device.type != "cuda":
        budget = DEFAULT_CPU_KV_CACHE_BYTES
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        runner.profile_run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = max(0, total - free - runner.initial_gpu_used - torch.cuda.memory_reserved())
        budget = int(total * cache.gpu_memory_utilization) - peak - non_torch - graph_reserve_bytes
        budget = min(budget, free - graph_reserve_bytes - (256 << 20))
        logger.info("memory: total %.1f GiB, in use before start %.2f GiB, profiling peak %.2f GiB, outside "
                    "torch %.2f GiB, graphs %.2f GiB -> KV cache %.2f GiB", total / 2**30,
                    runner.initial_gpu_used / 2**30, peak / 2**30, non_torch / 2**30, graph_reserve_bytes / 2**30,
                    budget / 2**30)
    return max(0, budget // per_block)
