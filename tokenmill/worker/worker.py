"""A Worker: one device's share of the engine. It owns the device, the model runner (model, persistent
batch, KV cache) and the start-up work done on that device. The engine core drives it with these calls,
in this order (with several ranks, an executor makes each call on every rank's worker):

    Worker(config, source)          picks the device
    device_info()                   -> DeviceInfo: what EngineConfig.resolve needs to know
    load_model(resolved config)     the runner: weights on the device, input buffers
    determine_num_blocks()          GEMM tuning, then a profiling step: how many KV blocks fit
    initialize_cache(n, n_host)     the KV pool (and its host tier)
    compile_or_warm_up()            CUDA graphs, then warm-up steps, so no kernel compiles while serving
    execute_model / sample_tokens / finish_step     every step
"""

from __future__ import annotations

import logging

import torch

from tokenmill.config import DeviceInfo, EngineConfig
from tokenmill.core.interface import ModelRunnerOutput, SchedulerOutput
from tokenmill.layers.fp8_ops import FP8_DTYPE
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


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.source = source
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
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
        return self.runner.kv_cache.bytes_per_block()

    def kv_cache_dtype(self) -> str:
        return str(self.runner.kv_cache.dtype).removeprefix("torch.")

    def determine_num_blocks(self) -> int:
        tune_gemms(self.runner)
        graph_reserve = GRAPH_MEMORY_RESERVE if self.runner.graphs.sizes else 0
        return determine_num_blocks(self.runner, self.config.cache, self.initial_gpu_used, graph_reserve)

    def initialize_cache(self, num_blocks: int, num_host_blocks: int = 0) -> None:
        self.runner.kv_cache.allocate(num_blocks)
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

    def sample_tokens(self, grammar_bitmask: torch.Tensor | None = None) -> None:
        self.runner.sample_tokens(grammar_bitmask)

    def finish_step(self) -> ModelRunnerOutput:
        return self.runner.finish_step()
