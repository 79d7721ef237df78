"""FP8 (e4m3) weights: quantized at load from a 16-bit checkpoint (`quantization="fp8"`), or read from an FP8
checkpoint: vLLM's and AutoFP8's `quant_method: "fp8"` (per-tensor scales, or DeepSeek-V3 / Qwen3-FP8's
block scales with `weight_block_size`), and compressed-tensors' (compressed_tensors.py), which reuses the
methods here.

After loading, a layer holds one of two forms:

    per channel   weight [N, K] e4m3, weight_scale [N] float32 (per-tensor checkpoint scales are spread over
                  their rows), input_scale a float32 scalar when the checkpoint's activation scales are static
    block scaled  weight [N, K] e4m3, weight_scale_inv [ceil(N / bn), ceil(K / bk)] float32

On the GPU (compute capability 8.9 or newer) a product quantizes its activations per token (per token group
of bk columns for block scales) and runs on the FP8 tensor cores; a single row (batch-1 decode) streams the
FP8 weights through a GEMV instead, its activations unquantized. On the CPU the weights are dequantized to
the model's dtype at load: the same checkpoints run there, at 16- or 32-bit speed. A layer whose weight its
model reads as a matrix (MLA's kv_b_proj) is dequantized at load on the GPU too (`dequantizing()`), as vLLM
does; under `quantization="fp8"` such a layer keeps its 16-bit weight. A MoE layer's experts in these formats
run through fp8_moe.py's method.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.fp8_format import FP8_DTYPE, FP8_MAX
from tokenmill.layers.quantization.base import LinearMethod, MoEMethod, QuantizationConfig, WeightLoader


def check_fp8_device(device: torch.device) -> None:
    """FP8 tensor cores came with compute capability 8.9 (Ada, Hopper); the CPU runs FP8 checkpoints dequantized."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"FP8 weights need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is {major}.{minor}")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., N, K] -> (e4m3 [..., N, K], float32 scales [..., N]): each row's absolute maximum maps to 448."""
    scale = weight.float().abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX
    return (weight.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """weight [..., N, K] e4m3 and its block scales [..., ceil(N / block_n), ceil(K / block_k)] -> [..., N, K]
    in `dtype` (the last blocks of a row or column may be partial)."""
    block_n, block_k = block_size
    full = scale.repeat_interleave(block_n, -2).repeat_interleave(block_k, -1)
    return (weight.float() * full[..., :weight.shape[-2], :weight.shape[-1]]).to(dtype)


def _output_shard_ids(layer: nn.Module) -> list[Any]:
    return {1: [None], 3: ["q", "k", "v"]}.get(layer.num_output_shards, list(range(layer.num_output_shards)))


def _per_shard_scalar_loader(layer: nn.Module) -> WeightLoader:
    """A loader for one scalar per packed shard (per-tensor scales): [num_output_shards]."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"{layer.prefix}: a per-tensor scale has one value, the checkpoint's has "
                             f"{tuple(loaded.shape)}")
        param.data[layer.shard_index(shard_id)] = loaded.reshape(())

    return load


def _scalar_param(layer: nn.Module, fill: float) -> nn.Parameter:
    param = nn.Parameter(torch.full((layer.num_output_shards,), fill, dtype=torch.float32), requires_grad=False)
    param.weight_loader = _per_shard_scalar_loader(layer)
    return param


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ (weight [N, K] e4m3 x weight_scale [N]).T (+ bias), on the GPU."""
    from tokenmill.layers.fp8_ops import fp8_gemv, fp8_small_m, fp8_small_m_supported, quant_fp8  # Triton: on GPUs
    x2 = x.reshape(-1, x.shape[-1])
    dynamic_16bit = input_scale is None and x2.dtype in (torch.bfloat16, torch.float16)
    if dynamic_16bit and x2.shape[0] == 1:
        out = fp8_gemv(x2, weight, weight_scale, bias)
    elif dynamic_16bit and fp8_small_m_supported(*x2.shape):
        out = fp8_small_m(x2, weight, weight_scale, bias)
    else:
        if input_scale is None:
            q, x_scale = quant_fp8(x2)
        else:
            q = (x2.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            x_scale = input_scale.reshape(1, 1).expand(x2.shape[0], 1).contiguous()  # rowwise: one per row
        out = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1), bias=bias,
                               out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Fp8LinearMethod(LinearMethod):
    """Per-channel FP8 weights with per-token dynamic activations (or a static per-tensor activation scale).

    `serialized`: the checkpoint holds e4m3 weights and `weight_scale`s (`weight_strategy` "tensor": one per
    matrix, "channel": one per row), and `input_scale`s if `static_input`; otherwise 16-bit weights are
    quantized per channel once loaded. `dequantize`: to the model's dtype at load on every device, not only
    on the CPU."""

    def __init__(self, serialized: bool, weight_strategy: str = "channel", static_input: bool = False,
                 dequantize: bool = False) -> None:
        self.serialized, self.weight_strategy, self.static_input = serialized, weight_strategy, static_input
        self.dequantize = dequantize
        self.dequantized = False  # once loaded: weight is the dequantized matrix, used by F.linear

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        self.params_dtype = params_dtype
        dtype = FP8_DTYPE if self.serialized else params_dtype
        weight = nn.Parameter(torch.empty(output_size_per_partition, input_size_per_partition, dtype=dtype),
                              requires_grad=False)
        weight.weight_loader = weight_loader
        layer.weight = weight
        if not self.serialized:
            return
        if self.weight_strategy == "tensor":
            layer.weight_scale = _scalar_param(layer, 1.0)
        else:
            layer.weight_scale = nn.Parameter(torch.empty(output_size_per_partition, dtype=torch.float32),
                                              requires_grad=False)
            layer.weight_scale.weight_loader = layer.load_sharded
        if self.static_input:
            layer.input_scale = _scalar_param(layer, 0.0)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.serialized:
            weight = layer.weight.data
            if self.weight_strategy == "tensor":  # each packed shard's scale over its rows
                scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
                for shard_id in _output_shard_ids(layer):
                    offset, size, _ = layer.output_shard(shard_id)
                    scale[offset:offset + size] = layer.weight_scale.data[layer.shard_index(shard_id)]
            else:
                scale = layer.weight_scale.data.reshape(-1)
        else:
            weight, scale = quantize_per_channel(layer.weight.data)
        input_scale = layer.input_scale.data.max() if self.static_input else None
        if self.dequantize or weight.device.type == "cpu":
            layer.weight = nn.Parameter((weight.float() * scale[:, None]).to(self.params_dtype), requires_grad=False)
            layer.weight_scale = layer.input_scale = None
            self.dequantized = True
            return
        check_fp8_device(weight.device)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
        layer.input_scale = nn.Parameter(input_scale.float(), requires_grad=False) if input_scale is not None else None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dequantized:
            return F.linear(x, layer.weight, bias)
        return fp8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, bias)

    def dequantizing(self, prefix: str) -> LinearMethod:
        """A 16-bit checkpoint's weight stays as it is; an FP8 one's is dequantized with its scales."""
        from tokenmill.layers.linear import UnquantizedLinearMethod

        if not self.serialized:
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(True, self.weight_strategy, self.static_input, dequantize=True)


class Fp8BlockLinearMethod(LinearMethod):
    """Block-scaled FP8 weights from the checkpoint (`weight_scale_inv`: the multiplier of each bn x bk block),
    activations quantized per token group of bk columns. `dequantize`: to the model's dtype at load on every
    device, not only on the CPU."""

    def __init__(self, block_size: tuple[int, int], dequantize: bool = False) -> None:
        self.block_size, self.dequantize = block_size, dequantize
        self.dequantized = False

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        self.params_dtype = params_dtype
        block_n, block_k = self.block_size
        layer.weight = nn.Parameter(torch.empty(output_size_per_partition, input_size_per_partition,
                                                dtype=FP8_DTYPE), requires_grad=False)
        layer.weight.weight_loader = weight_loader
        layer.weight_scale_inv = nn.Parameter(torch.empty(-(-output_size_per_partition // block_n),
                                                          -(-input_size_per_partition // block_k),
                                                          dtype=torch.float32), requires_grad=False)
        layer.weight_scale_inv.weight_loader = (lambda param, loaded, shard_id=None: layer.load_sharded(
            param, loaded, shard_id, row_unit=block_n, col_unit=block_k))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight, scale = layer.weight.data, layer.weight_scale_inv.data
        if self.dequantize or weight.device.type == "cpu":
            layer.weight = nn.Parameter(dequantize_blocks(weight, scale, self.block_size, self.params_dtype),
                                        requires_grad=False)
            layer.weight_scale_inv = None
            self.dequantized = True
            return
        check_fp8_device(weight.device)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dequantized:
            return F.linear(x, layer.weight, bias)
        from tokenmill.layers.fp8_ops import block_fp8_matmul, fp8_gemv, quant_fp8

        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 1 and x2.dtype in (torch.bfloat16, torch.float16):
            out = fp8_gemv(x2, layer.weight, layer.weight_scale_inv, bias, block_size=self.block_size)
        else:
            q, x_scale = quant_fp8(x2, self.block_size[1])
            out = block_fp8_matmul(q, x_scale, layer.weight, layer.weight_scale_inv, self.block_size, x.dtype, bias)
        return out.reshape(*x.shape[:-1], layer.weight.shape[0])

    def dequantizing(self, prefix: str) -> LinearMethod:
        return Fp8BlockLinearMethod(self.block_size, dequantize=True)


def is_ignored(prefix: str, ignored: list[str]) -> bool:
    """Whether a layer's prefix is among a checkpoint's unquantized layers: a name, a name's end (".lm_head"),
    or "re:" and a regular expression."""
    for entry in ignored:
        if entry.startswith("re:"):
            if re.fullmatch(entry[3:], prefix):
                return True
        elif prefix == entry or prefix.endswith("." + entry):
            return True
    return False


class Fp8Config(QuantizationConfig):
    """`quant_method: "fp8"` checkpoints (activation_scheme dynamic or static; weight_block_size for block
    scales), or, made by `online()`, `quantization="fp8"` on a 16-bit checkpoint."""

    name = "fp8"

    def __init__(self, serialized: bool, static_input: bool = False, block_size: tuple[int, int] | None = None,
                 ignored_layers: list[str] | None = None) -> None:
        self.serialized, self.static_input, self.block_size = serialized, static_input, block_size
        self.ignored_layers = ignored_layers or []

    @classmethod
    def online(cls) -> Fp8Config:
        return cls(serialized=False)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        if (config.get("fmt") or "e4m3") != "e4m3":
            raise ValueError(f"quantization_config.fmt must be e4m3 (the FP8 format tokenmill reads), got "
                             f"{config['fmt']!r}")
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"quantization_config.activation_scheme must be dynamic or static, got {scheme!r}")
        block = config.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or scheme != "dynamic":
                raise ValueError("quantization_config.weight_block_size must be [block_n, block_k], with dynamic "
                                 f"activations; got {block!r} with {scheme}")
            block = (int(block[0]), int(block[1]))
        ignored = config.get("ignored_layers") or config.get("modules_to_not_convert")
        return cls(True, scheme == "static", block, ignored)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        from tokenmill.layers.linear import UnquantizedLinearMethod

        if is_ignored(prefix, self.ignored_layers):
            return UnquantizedLinearMethod()
        if self.block_size is not None:
            return Fp8BlockLinearMethod(self.block_size)
        return Fp8LinearMethod(self.serialized, "tensor", self.static_input)

    def get_moe_method(self, layer: nn.Module, prefix: str) -> MoEMethod:
        from tokenmill.layers.fused_moe import UnquantizedMoEMethod
        from tokenmill.layers.quantization.fp8_moe import Fp8MoEMethod

        if is_ignored(prefix, self.ignored_layers):
            return UnquantizedMoEMethod()
        if self.block_size is not None:
            return Fp8MoEMethod(True, "block", block_size=self.block_size)
        return Fp8MoEMethod(self.serialized, "tensor" if self.serialized else "channel", self.static_input)
