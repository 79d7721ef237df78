"""Engine configuration: one dataclass per concern, validated on construction, gathered in EngineConfig.

Torch-free: the frontend builds and validates a config without loading torch. Dtypes stay names
("bfloat16") until a worker turns them into torch dtypes.

A config is built from what the user gave (LLM(...) keyword arguments or CLI flags), where "auto" and
None mean "decide for me". `EngineConfig.resolve` makes every such decision in one place, once the
model's config and the device are known, and returns a new, complete config; nothing changes it after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from tokenmill.loader.registry import LOAD_FORMATS
from tokenmill.spec_decode.config import SpeculativeConfig

# Accepted dtype names -> the canonical one.
DTYPE_NAMES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")
# Who runs the engine: the defaults of a few settings differ (vLLM's UsageContext).
USAGE_CONTEXTS = ("llm", "serve")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


def dtype_name(dtype: Any) -> str:
    """A dtype given as a name or as a torch.dtype ("torch.bfloat16"), as its name."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class DeviceInfo:
    """What the worker reports of its device, for the decisions `EngineConfig.resolve` makes."""

    type: str  # "cuda" | "cpu"
    total_memory: int = 0  # bytes; 0 where unknown (CPU)
    supports_bf16: bool = False


@dataclass
class ModelConfig:
    model: str = "default"
    tokenizer: str | None = None
    dtype: str = "auto"  # "auto" or a DTYPE_NAMES key (a torch.dtype is taken by its name)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    load_format: str = "auto"
    served_model_name: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    # The weight format: None (the checkpoint's own), or a method to quantize a 16-bit checkpoint with ("fp8").
    quantization: str | None = None
    # Sampling defaults: "auto" (the model's generation config), "vllm" (none), or a folder holding one.
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.dtype = dtype_name(self.dtype)
        _require(self.dtype == "auto" or self.dtype in DTYPE_NAMES, "dtype",
                 f"must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        _require(self.load_format in LOAD_FORMATS, "load_format", f"must be one of {LOAD_FORMATS}, got "
                 f"{self.load_format!r}")
        _require(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len > 0),
                 "max_model_len", f"must be a positive integer, got {self.max_model_len!r}")


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # overrides gpu_memory_utilization when set
    enable_prefix_caching: bool = True
    kv_offload_size: float = 0.0  # GiB of host memory for evicted KV blocks (0 = off)
    # "auto": the model's dtype; "fp8" (= "fp8_e4m3"): e4m3 with per-layer key and value scales, twice the tokens
    kv_cache_dtype: str = "auto"
    # an FP8 cache's scales from the first batch's keys and values (vLLM's --calculate-kv-scales), not the
    # checkpoint's or 1.0
    calculate_kv_scales: bool = False

    def __post_init__(self) -> None:
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
                 f"must be a power of two up to 128, got {self.block_size!r}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _require(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes",
                 f"must be positive, got {self.kv_cache_memory_bytes!r}")
        _require(self.kv_offload_size >= 0, "kv_offload_size", f"must be >= 0 GiB, got {self.kv_offload_size!r}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                 f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _require(not self.calculate_kv_scales or self.kv_cache_dtype != "auto", "calculate_kv_scales",
                 "needs an FP8 KV cache (kv_cache_dtype='fp8')")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: default_max_num_batched_tokens
    enable_chunked_prefill: bool = True
    # Schedule step N+1 while step N runs on the device, its sampled tokens fed to N+1 on the device.
    async_scheduling: bool = True
    max_model_len: int = 0  # the model config's, copied by EngineConfig.resolve
    # Steps in flight at once, each of requests the others do not hold: a pipeline's micro-batches
    # (pipeline_parallel_size, set by EngineConfig.resolve, which then turns async_scheduling off).
    max_concurrent_batches: int = 1
    # Draft tokens a request may verify in a step (speculative decoding's k, set by EngineConfig.resolve), and
    # KV slots reserved past a step's tokens for a draft model's guesses (k with a draft model).
    num_speculative_tokens: int = 0
    num_lookahead_slots: int = 0
    # The speculative_config's dynamic draft length (spec_decode/draft_policy.py), copied by EngineConfig.resolve.
    spec_disable_by_batch_size: int | None = None
    spec_disable_by_acceptance_rate: float | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs",
                 f"must be a positive integer, got {self.max_num_seqs!r}")
        _require(self.max_num_batched_tokens is None or (isinstance(self.max_num_batched_tokens, int)
                                                          and self.max_num_batched_tokens >= 1),
                 "max_num_batched_tokens", f"must be a positive integer, got {self.max_num_batched_tokens!r}")


def default_max_num_batched_tokens(usage_context: str, device: DeviceInfo) -> int:
    """vLLM's per-step token budget when none is given: a server takes shorter steps (steadier inter-token
    latency) than offline use, which takes 16384 on GPUs of 70 GiB or more (H100, H200)."""
    if usage_context == "serve":
        return 8192
    return 16384 if device.type == "cuda" and device.total_memory >= 70 * 2**30 else 8192


def resolve_max_model_len(hf_config: Any, requested: int | None) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if requested is None:
        if limit is None:
            raise ValueError("the model config has no max_position_embeddings; pass max_model_len")
        return int(limit)
    if limit is not None and requested > limit:
        raise ValueError(f"max_model_len={requested} is larger than the model's max_position_embeddings={limit}")
    return requested


def resolve_dtype(requested: str, checkpoint_dtype: str | None, device: DeviceInfo) -> str:
    """'auto' means the checkpoint's dtype on GPU (half precision if it is float32 or unknown), float32 on
    CPU, where half precision is slow."""
    if requested != "auto":
        return DTYPE_NAMES[requested]
    if device.type == "cpu":
        return "float32"
    if checkpoint_dtype in (None, "float32"):
        return "bfloat16" if device.supports_bf16 else "float16"
    return DTYPE_NAMES.get(checkpoint_dtype, checkpoint_dtype)


def resolve_quantization(model: ModelConfig, hf_config: Any, device: DeviceInfo) -> str | None:
    """A GGUF file on the CPU keeps its weights quantized ("gguf") unless a dtype is asked for: `--dtype
    float32` dequantizes them, as HF transformers does. On a GPU they are dequantized at load unless
    `quantization="gguf"` keeps them 4-bit (the Triton kernel, not yet timed against the dequantized path)."""
    from tokenmill.source.gguf_file import GGUFConfig

    if model.quantization is None and model.dtype == "auto" and device.type == "cpu" \
            and isinstance(hf_config, GGUFConfig):
        return "gguf"
    return model.quantization


def checkpoint_dtype(hf_config: Any) -> str | None:
    """The dtype a HF config names for its weights (`dtype`, or transformers 4's `torch_dtype`), as a name. Read
    from the instance's own fields: transformers 5 warns on every read of its `torch_dtype` alias."""
    fields = vars(hf_config)
    dtype = fields.get("dtype") or fields.get("torch_dtype")
    return None if dtype is None else dtype_name(dtype)


def num_routed_experts(hf_config: Any) -> int:
    """A MoE model's experts per layer under each family's name (Qwen3-MoE's num_experts; Mixtral's, and
    transformers 5's for Qwen3-MoE, num_local_experts; DeepSeek's n_routed_experts); 0 for a dense model."""
    return getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None) \
        or getattr(hf_config, "n_routed_experts", None) or 0


# What the expert-parallel ranks are, for messages: within one core, or over the data-parallel cores too
EP_RANKS = {False: "tensor_parallel_size", True: "data_parallel_size x tensor_parallel_size"}


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # MoE layers: each rank holds whole experts, 1/expert_parallel_size of them, instead of a slice of every
    # expert (layers/fused_moe.py); attention stays tensor-parallel. With data_parallel_size > 1 the experts
    # are spread over every core's ranks, which exchange tokens all-to-all and step together.
    enable_expert_parallel: bool = False
    # Engine cores behind one server, each of tensor x pipeline ranks (engine/dp_client.py); the rank is set
    # for each core's own config.
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    # Where the cores' ranks meet when expert parallelism spans them (one world of them all, on this host);
    # chosen by the server's data-parallel client, 0 otherwise.
    data_parallel_master_port: int = 0
    # "uni": one rank in the core's process; "mp": a process per further rank (the default above one rank)
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
                 "tensor_parallel_size", f"must be a positive integer, got {self.tensor_parallel_size!r}")
        _require(isinstance(self.pipeline_parallel_size, int) and self.pipeline_parallel_size >= 1,
                 "pipeline_parallel_size", f"must be a positive integer, got {self.pipeline_parallel_size!r}")
        _require(isinstance(self.data_parallel_size, int) and self.data_parallel_size >= 1,
                 "data_parallel_size", f"must be a positive integer, got {self.data_parallel_size!r}")
        _require(isinstance(self.enable_expert_parallel, bool), "enable_expert_parallel",
                 f"must be a bool, got {self.enable_expert_parallel!r}")
        _require(self.distributed_executor_backend in (None, *EXECUTOR_BACKENDS), "distributed_executor_backend",
                 f"must be one of {EXECUTOR_BACKENDS}, got {self.distributed_executor_backend!r}")
        _require(self.distributed_executor_backend != "uni" or self.world_size == 1, "distributed_executor_backend",
                 f"'uni' runs one rank; tensor_parallel_size={self.tensor_parallel_size} x "
                 f"pipeline_parallel_size={self.pipeline_parallel_size} needs 'mp'")
        _require(not self.spans_cores or self.pipeline_parallel_size == 1, "pipeline_parallel_size",
                 "must be 1 when enable_expert_parallel spreads the experts over data_parallel_size > 1 cores")
        _require(not self.spans_cores or self.distributed_executor_backend != "ray", "distributed_executor_backend",
                 "'ray' places ranks on several hosts; enable_expert_parallel over data_parallel_size > 1 cores "
                 "joins the cores' ranks on this host ('mp')")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def spans_cores(self) -> bool:
        """Expert parallelism over several data-parallel cores: their ranks form one world, the MoE layers
        exchange tokens between them, and the cores step together."""
        return self.enable_expert_parallel and self.data_parallel_size > 1

    @property
    def expert_parallel_size(self) -> int:
        """The ranks a MoE layer's experts are spread over: every core's tensor-parallel ranks with expert
        parallelism (data_parallel_size x tensor_parallel_size), else 1."""
        return self.tensor_parallel_size * self.data_parallel_size if self.enable_expert_parallel else 1

    def executor_backend(self) -> str:
        return self.distributed_executor_backend or ("uni" if self.world_size == 1 else "mp")

    def check_model(self, hf_config: Any) -> None:
        """Refuses a split the model's shapes do not allow, naming the flag."""
        tp, ep = self.tensor_parallel_size, self.expert_parallel_size
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        sizes = [("num_attention_heads", heads), ("intermediate_size", hf_config.intermediate_size)]
        if ep == 1:  # tensor parallelism alone splits every expert
            sizes.append(("moe_intermediate_size", getattr(hf_config, "moe_intermediate_size", None)))
        num_experts = num_routed_experts(hf_config)
        _require(num_experts % ep == 0, "enable_expert_parallel",
                 f"spreads the experts over the {EP_RANKS[self.spans_cores]} ranks; the model's {num_experts} "
                 f"experts are not divisible by {ep}")
        for name, size in sizes:
            _require(size is None or size % tp == 0, "tensor_parallel_size",
                     f"must divide the model's {name} ({size}), got {tp}")
        _require(kv_heads % tp == 0 or tp % kv_heads == 0, "tensor_parallel_size",
                 f"must divide or be a multiple of the model's num_key_value_heads ({kv_heads}), got {tp}")
        layers = hf_config.num_hidden_layers
        _require(self.pipeline_parallel_size <= layers, "pipeline_parallel_size",
                 f"must be at most the model's num_hidden_layers ({layers}), got {self.pipeline_parallel_size}")


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
    usage_context: str = "llm"  # "llm" (offline, LLM) or "serve" (the OpenAI server)
    # vLLM's speculative_config: a dict or its JSON string (--speculative-config), made a SpeculativeConfig
    speculative_config: SpeculativeConfig | dict | str | None = None

    def __post_init__(self) -> None:
        _require(self.usage_context in USAGE_CONTEXTS, "usage_context",
                 f"must be one of {USAGE_CONTEXTS}, got {self.usage_context!r}")
        if self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        spec = self.speculative_config
        if spec is not None:
            _require(self.parallel.pipeline_parallel_size == 1, "speculative_config",
                     "does not work with pipeline_parallel_size > 1")
            _require(not self.parallel.spans_cores, "speculative_config",
                     "does not work with enable_expert_parallel over data_parallel_size > 1 cores")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
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

    def resolve(self, hf_config: Any, device: DeviceInfo) -> EngineConfig:
        """A copy with every "auto" and None decided for this model on this device: dtype, max_model_len
        (also the scheduler's), the step's token budget and the device."""
        self.parallel.check_model(hf_config)
        max_model_len = resolve_max_model_len(hf_config, self.model.max_model_len)
        model = dataclasses.replace(self.model, max_model_len=max_model_len,
                                    dtype=resolve_dtype(self.model.dtype, checkpoint_dtype(hf_config), device),
                                    quantization=resolve_quantization(self.model, hf_config, device))
        budget = self.scheduler.max_num_batched_tokens or default_max_num_batched_tokens(self.usage_context, device)
        pp = self.parallel.pipeline_parallel_size
        spec = self.speculative_config
        k = spec.num_speculative_tokens if spec is not None else 0
        lookahead = k if spec is not None and spec.method != "ngram" else 0
        scheduler = dataclasses.replace(
            self.scheduler, max_model_len=max_model_len, max_num_batched_tokens=budget, max_concurrent_batches=pp,
            num_speculative_tokens=k, num_lookahead_slots=lookahead,
            spec_disable_by_batch_size=spec.disable_by_batch_size if spec is not None else None,
            spec_disable_by_acceptance_rate=spec.disable_by_acceptance_rate if spec is not None else None,
            async_scheduling=self.scheduler.async_scheduling and pp == 1)
        # A pipeline's stages hand activations over with send/recv between steps, and experts spread over cores
        # exchange tokens in counts known only on the host: no CUDA graphs there.
        return dataclasses.replace(self, model=model, scheduler=scheduler,
                                   device=device.type if self.device == "auto" else self.device,
                                   enforce_eager=self.enforce_eager or self.parallel.pipeline_parallel_size > 1
                                   or self.parallel.spans_cores)
