"""A Worker: one device's share of the engine. It owns the device, the model runner (model, persistent
batch, KV cache) and the start-up work done on that device. The engine core drives it with these calls,
in this order (with several ranks, an executor makes each call on every rank's worker):

    Worker(config, source, rank)    picks the device; with several ranks, joins their torch.distributed world
    device_info()                   -> DeviceInfo: what EngineConfig.resolve needs to know
    load_model(resolved config)     the runner: weights on the device, input buffers
    determine_num_blocks()          GEMM tuning, then a profiling step: how many KV blocks fit
    initialize_cache(n, n_host)     the KV pool (and its host tier)
    compile_or_warm_up()            CUDA graphs, then warm-up steps, so no kernel compiles while serving
    execute_model / sample_tokens / finish_step     every step
    execute_dummy                   a step of one made-up token, for a core with nothing to run while
                                    other cores' steps need its experts (expert parallelism over cores)
"""

from __future__ import annotations

import logging
import os

import torch

from tokenmill.config import DeviceInfo, EngineConfig
from tokenmill.core.interface import ModelRunnerOutput, SchedulerOutput
from tokenmill.distributed.parallel_state import dp_sync, init_distributed
from tokenmill.layers.fp8_format import FP8_DTYPE
from tokenmill.layers.quantization.fp8 import check_fp8_device
from tokenmill.source import ModelSource
from tokenmill.worker.cuda_graphs import capture_model_graphs
from tokenmill.worker.memory import determine_num_blocks
from tokenmill.worker.model_runner import ModelRunner, StepInfo
from tokenmill.worker.warm_up import tune_gemms, warm_up

logger = logging.getLogger(__name__)

# Decode graphs keep their activations (and the [batch, vocab] logits) in a private pool, taken after
# the KV cache is sized.
GRAPH_MEMORY_RESERVE = 512 << 20
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Joining the ranks' world, and any collective after, fails after this long instead of hanging.
DIST_TIMEOUT_S = float(os.environ.get("TOKENMILL_DIST_TIMEOUT_S", "300"))


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource, rank: int = 0,
                 distributed_init_method: str | None = None, device_index: int | None = None) -> None:
        """`rank` of config.parallel.world_size; above one rank, `distributed_init_method` is where the ranks
        meet (tcp://host:port) and rank r takes GPU r of this host (of its data-parallel core's group), or GPU
        `device_index` where the process sees only its own (a Ray actor)."""
        self.source, self.rank = source, rank
        world_size, dp = config.parallel.world_size, config.parallel.data_parallel_size
        device_type = config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        # data-parallel core d's ranks take the d-th group of world_size GPUs
        index = config.parallel.data_parallel_rank * world_size + rank if device_index is None else device_index
        self.device = torch.device(device_type.split(":")[0], index) if world_size * dp > 1 \
            and device_type != "cpu" else torch.device(device_type)
        if self.device.type == "cuda" and self.device.index is not None:
            if device_index is None and world_size * dp > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size x pipeline_parallel_size x data_parallel_size = "
                                 f"{world_size * dp} needs as many GPUs; this host has {torch.cuda.device_count()}")
            torch.cuda.set_device(self.device)
        parallel, cores = config.parallel, (0, 1)  # (this core, of how many) in the world joined
        if parallel.spans_cores:  # one world of every core's ranks (distributed/parallel_state.py)
            distributed_init_method = f"tcp://127.0.0.1:{parallel.data_parallel_master_port}"
            cores = (parallel.data_parallel_rank, dp)
        if world_size > 1 or parallel.spans_cores:
            init_distributed(rank, world_size, parallel.tensor_parallel_size, distributed_init_method,
                             "nccl" if self.device.type == "cuda" else "gloo", DIST_TIMEOUT_S,
                             parallel.enable_expert_parallel, *cores)
        # GPU memory in use before this engine allocates anything (other processes, our CUDA context).
        self.initial_gpu_used = (lambda free, total: total - free)(*torch.cuda.mem_get_info()) \
            if self.device.type == "cuda" else 0
        self.runner: ModelRunner | None = None

    def device_info(self) -> DeviceInfo:
        if self.device.type != "cuda":
            return DeviceInfo(self.device.type)
        return DeviceInfo(self.device.type, torch.cuda.get_device_properties(self.device).total_memory,
                          torch.cuda.is_bf16_supported())

    def load_model(self, config: EngineConfig) -> None:
        self.config = config
        kv_cache_dtype = None
        if config.cache.kv_cache_dtype.startswith("fp8"):
            check_fp8_device(self.device)
            kv_cache_dtype = FP8_DTYPE
        self.runner = ModelRunner(config, self.source, self.device, TORCH_DTYPES[config.model.dtype], kv_cache_dtype)

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def kv_cache_dtype(self) -> str:
        return str(self.runner.kv_cache.dtype).removeprefix("torch.")

    def determine_num_blocks(self) -> int:
        tune_gemms(self.runner)
        graph_reserve = GRAPH_MEMORY_RESERVE if self.runner.graphs.sizes else 0
        return determine_num_blocks(self.runner, self.config.cache, self.initial_gpu_used, graph_reserve)

    def initialize_cache(self, num_blocks: int, num_host_blocks: int = 0) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        if num_host_blocks:
            self.runner.kv_cache.allocate_host_tier(num_host_blocks)

    def compile_or_warm_up(self) -> None:
        capture_model_graphs(self.runner)
        if self.device.type == "cuda":  # compiles what the graphs did not, before the first request
            logger.info("warm-up steps: %.1f s", warm_up(self.runner))
        if self.config.cache.calculate_kv_scales:
            self.runner.calculate_kv_scales()

    def execute_model(self, scheduler_output: SchedulerOutput) -> StepInfo:
        return self.runner.execute_model(scheduler_output)

    def execute_dummy(self) -> None:
        self.runner.execute_dummy()

    def dp_sync(self, flags: list[int]) -> list[int]:
        return dp_sync(flags)

    def sample_tokens(self, grammar_bitmask: torch.Tensor | None = None) -> ModelRunnerOutput | None:
        return self.runner.sample_tokens(grammar_bitmask)

    def finish_step(self) -> ModelRunnerOutput:
        return self.runner.finish_step()
