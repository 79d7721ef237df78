"""Engine configuration: one dataclass per concern, validated on construction, gathered in EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


@dataclass
class ModelConfig:
    model: str = "default"
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    seed: int = 0
    load_format: str = "auto"
    served_model_name: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.dtype, torch.dtype) or self.dtype == "auto" or self.dtype in _DTYPES,
                 "dtype", f"must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        _require(self.load_format in LOAD_FORMATS, "load_format", f"must be one of {LOAD_FORMATS}, got "
                 f"{self.load_format!r}")
        _require(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len > 0),
                 "max_model_len", f"must be a positive integer, got {self.max_model_len!r}")

    def resolve_dtype(self, config_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
        """'auto' means the checkpoint's dtype on GPU, float32 on CPU (where half precision is slow)."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        if config_dtype in (None, torch.float32):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return config_dtype


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # overrides gpu_memory_utilization when set
    enable_prefix_caching: bool = True
    kv_offload_size: float = 0.0  # GiB of host memory for evicted KV blocks (0 = off)

    def __post_init__(self) -> None:
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
                 f"must be a power of two up to 128, got {self.block_size!r}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _require(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes",
                 f"must be positive, got {self.kv_cache_memory_bytes!r}")
        _require(self.kv_offload_size >= 0, "kv_offload_size", f"must be >= 0 GiB, got {self.kv_offload_size!r}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    # None: chosen for the device by `resolve_max_num_batched_tokens` (vLLM's defaults).
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    # Schedule step N+1 while step N runs on the device, its sampled tokens fed to N+1 on the device.
    async_scheduling: bool = True
    max_model_len: int = 0  # filled in from the model config

    def __post_init__(self) -> None:
        _require(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs",
                 f"must be a positive integer, got {self.max_num_seqs!r}")
        _require(self.max_num_batched_tokens is None or (isinstance(self.max_num_batched_tokens, int)
                                                          and self.max_num_batched_tokens >= 1),
                 "max_num_batched_tokens", f"must be a positive integer, got {self.max_num_batched_tokens!r}")

    def resolve_max_num_batched_tokens(self, device: torch.device) -> None:
        """The per-step token budget when none was given, as vLLM picks it for offline use: 16384 on GPUs of
        70 GiB or more (H100, H200), 8192 elsewhere. The server passes its own (8192)."""
        if self.max_num_batched_tokens is None:
            big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 70 * 2**30
            self.max_num_batched_tokens = 16384 if big else 8192


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size == 1, "tensor_parallel_size",
                 f"must be 1 in this version, got {self.tensor_parallel_size!r}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    enforce_eager: bool = False
    attention_backend: str | None = None  # None = chosen by device
    disable_log_stats: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Builds the tree from flat vLLM-style keyword arguments (LLM(...) and the CLI)."""
        sections = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                    "parallel": ParallelConfig}
        parts: dict[str, dict[str, Any]] = {name: {} for name in sections}
        top: dict[str, Any] = {}
        top_names = {f.name for f in fields(cls)} - set(sections)
        section_fields = {name: {f.name for f in fields(section)} for name, section in sections.items()}
        for key, value in kwargs.items():
            # First match wins: max_model_len is the model's (the scheduler's copy is derived from it).
            for name in sections:
                if key in section_fields[name]:
                    parts[name][key] = value
                    break
            else:
                if key not in top_names:
                    raise TypeError(f"unexpected engine argument {key!r}")
                top[key] = value
        return cls(**{name: section(**parts[name]) for name, section in sections.items()}, **top)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
