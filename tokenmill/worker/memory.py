"""How many KV-cache blocks fit: an explicit byte budget, the CPU's need, or a profiled GPU share."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from tokenmill.config import CacheConfig
from tokenmill.core.kv_cache_manager import cdiv
from tokenmill.forward_context import set_forward_context
from tokenmill.layers.sampler import SamplingMetadata
from tokenmill.worker.step_inputs import made_up_metadata

if TYPE_CHECKING:
    from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# On the CPU the pool is sized by need, at most this share of the memory available at start-up.
CPU_KV_CACHE_SHARE = 0.25


def available_host_memory() -> int:
    """Bytes of memory the system can give without swapping (MemAvailable), or the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_kv_cache_bytes(bytes_per_block: int, block_size: int, max_num_seqs: int, max_model_len: int,
                       available: int) -> int:
    """Enough for max_num_seqs sequences of max_model_len tokens, capped at CPU_KV_CACHE_SHARE of `available`
    but never below one sequence. Its pages are taken only as blocks are written (KVCache.allocate)."""
    blocks_per_seq = -(-max_model_len // block_size)
    need = bytes_per_block * blocks_per_seq * max_num_seqs
    return max(min(need, int(CPU_KV_CACHE_SHARE * available)), bytes_per_block * blocks_per_seq)


@torch.inference_mode()
def profile_run(runner: ModelRunner) -> None:
    """A worst-case step for memory profiling: max_num_batched_tokens prompt tokens (as many requests of at
    most max_model_len as the budget holds, over a scratch cache of just their blocks), then max_num_seqs
    rows of logits through the sampler with every filter on."""
    num_tokens, bs, max_model_len = runner.max_num_tokens, runner.block_size, runner.max_model_len
    seq_lens = [min(max_model_len, num_tokens - start) for start in range(0, num_tokens, max_model_len)]
    blocks_per_seq = [cdiv(n, bs) for n in seq_lens]
    block_table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    slots, first_block = [], 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        block_table[i, :nb] = torch.arange(first_block, first_block + nb)
        slots.append(torch.arange(n) + first_block * bs)
        first_block += nb
    device = runner.device
    with runner.kv_cache.scratch(sum(blocks_per_seq)):
        metadata, positions = made_up_metadata(seq_lens, seq_lens, block_table, torch.cat(slots), max_model_len,
                                               device)
        input_ids = torch.randint(0, runner.vocab_size, (num_tokens,), device=device)
        with set_forward_context(metadata, runner.backend):
            hidden_states = runner.model(input_ids, positions)
        num_rows = min(runner.max_num_reqs, num_tokens)
        logits = runner.model.compute_logits(hidden_states[:num_rows])
        ones = torch.ones(num_rows, device=device)
        runner.sampler(logits, SamplingMetadata(
            temperature=ones, top_p=ones * 0.9, top_k=torch.full((num_rows,), 50, device=device),
            min_p=ones * 0.05, all_greedy=False, max_num_logprobs=20))


def determine_num_blocks(runner: ModelRunner, cache: CacheConfig, initial_gpu_used: int,
                         graph_reserve_bytes: int = 0) -> int:
    """KV blocks for `runner`'s model.

    On GPU: gpu_memory_utilization x total memory is this engine's share; from it go what the engine
    holds outside PyTorch's allocator (measured against `initial_gpu_used`, the memory in use before it
    started), the peak of a profiling forward pass at max_num_batched_tokens (weights included), minus the
    CUDA-graph reserve; and never more than is free now.
    """
    per_block = runner.kv_bytes_per_block()
    if cache.kv_cache_memory_bytes is not None:
        budget = cache.kv_cache_memory_bytes
    elif runner.device.type != "cuda":
        budget = cpu_kv_cache_bytes(per_block, runner.block_size, runner.max_num_reqs, runner.max_model_len,
                                    available_host_memory())
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        profile_run(runner)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = max(0, total - free - initial_gpu_used - torch.cuda.memory_reserved())
        budget = int(total * cache.gpu_memory_utilization) - peak - non_torch - graph_reserve_bytes
        budget = min(budget, free - graph_reserve_bytes - (256 << 20))
        logger.info("memory: total %.1f GiB, in use before start %.2f GiB, profiling peak %.2f GiB, outside "
                    "torch %.2f GiB, graphs %.2f GiB -> KV cache %.2f GiB", total / 2**30,
                    initial_gpu_used / 2**30, peak / 2**30, non_torch / 2**30, graph_reserve_bytes / 2**30,
                    budget / 2**30)
    return max(0, budget // per_block)
