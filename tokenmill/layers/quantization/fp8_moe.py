"""FP8 (e4m3) experts of a MoE layer: the formats of fp8.py and compressed_tensors.py, for FusedMoE's stacked
experts (w13 [E, 2I, H]: gate rows, then up rows; w2 [E, H, I]; I this rank's share of the intermediate size).

    block scaled  (`quant_method: "fp8"` with `weight_block_size` [bn, bk], DeepSeek-V3 and Qwen3-FP8's form)
                  w13_weight_scale_inv [E, 2 * ceil(I / bn), ceil(H / bk)]: the gate's rows of blocks, then
                  the up's, each half rounded up on its own, so a size that is no multiple of the block (tiny
                  models) keeps the checkpoint's blocks; w2_weight_scale_inv [E, ceil(H / bn), ceil(I / bk)]
    per tensor    (`quant_method: "fp8"` without blocks, compressed-tensors' "tensor") one scale per expert
                  matrix, w13_weight_scale [E, 2] (gate, up), w2_weight_scale [E, 1]; spread over rows once loaded
    per channel   (compressed-tensors' "channel") w13_weight_scale [E, 2I], w2_weight_scale [E, H]
    online        (`quantization="fp8"` on a 16-bit checkpoint) per channel, quantized once loaded

Static activation scales (`input_scale`, per expert and projection) become one per projection, the largest
over the experts (an activation quantized with it fits every expert's range).

Under tensor parallelism a rank's gate/up rows and down columns are I consecutive ones of the checkpoint's,
so block scales slice with them only when I is a whole number of blocks: otherwise the layer is refused,
naming tensor_parallel_size (expert parallelism keeps experts whole, so any blocks do). On the GPU the
experts stay e4m3 and run through fused_moe_triton's grouped GEMM with their scales (activations quantized
per token group of bk, or per token); on the CPU they are dequantized to the model's dtype at load, as
fp8.py's dense layers are.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.layers.fp8_format import FP8_DTYPE
from tokenmill.layers.fused_moe import UnquantizedMoEMethod
from tokenmill.layers.quantization.base import WeightLoader
from tokenmill.layers.quantization.fp8 import check_fp8_device, dequantize_blocks, quantize_per_channel

STRATEGIES = ("tensor", "channel", "block")


def _per_tensor_loader(layer: nn.Module) -> WeightLoader:
    """One scalar per (expert, projection): [E, 2] (gate, up) for w13, [E, 1] for w2; every rank holding the
    expert holds them."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"{layer.prefix}: a per-tensor scale has one value, expert {expert_id} {shard_id}'s "
                             f"has {tuple(loaded.shape)}")
        local_id = layer.local_expert(expert_id)
        if local_id is not None:
            param.data[local_id, 1 if shard_id == "w3" else 0] = loaded.reshape(())

    return load


def _per_channel_loader(layer: nn.Module) -> WeightLoader:
    """Per-channel scales ([rows] or [rows, 1] in the checkpoint): the gate's and up's sliced as their rows,
    the down projection's [H] whole on every rank."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        if shard_id != "w2":
            layer.weight_loader(param, loaded.reshape(-1), shard_id, expert_id)
        elif loaded.numel() != param.shape[1]:
            raise ValueError(f"{layer.prefix}: expert {expert_id}'s down projection has {param.shape[1]} "
                             f"channels, its scale {tuple(loaded.shape)}")
        elif layer.local_expert(expert_id) is not None:
            param.data[layer.local_expert(expert_id)] = loaded.reshape(-1)

    return load


def _dequantize_per_expert(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None,
                           segment_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 experts [E, N, K] and their scales (per channel [E, N], or blocks counted in segments of
    segment_rows rows) -> [E, N, K] in `dtype`, one expert at a time (the float32 copy stays one expert's)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for expert_id, (rows, rows_scale) in enumerate(zip(weight, scale)):
        if block_size is None:
            out[expert_id] = (rows.float() * rows_scale[:, None]).to(dtype)
            continue
        segments = rows.shape[0] // segment_rows
        for segment, (part, part_scale) in enumerate(zip(rows.split(segment_rows), rows_scale.chunk(segments))):
            out[expert_id, segment * segment_rows:(segment + 1) * segment_rows] = dequantize_blocks(
                part, part_scale, block_size, dtype)
    return out


class Fp8MoEMethod(UnquantizedMoEMethod):
    """FP8 experts. `serialized`: the checkpoint holds e4m3 experts and their scales (`strategy` "tensor",
    "channel" or "block" with `block_size`), and input_scales if `static_input`; otherwise 16-bit experts are
    quantized per channel once loaded. Once dequantized (CPU), the experts run as unquantized ones."""

    def __init__(self, serialized: bool, strategy: str = "channel", static_input: bool = False,
                 block_size: tuple[int, int] | None = None) -> None:
        if strategy not in STRATEGIES or (strategy == "block") != (block_size is not None):
            raise ValueError(f"FP8 experts: strategy {strategy!r} with block size {block_size} (known: "
                             f"{STRATEGIES}, block sizes with 'block' only)")
        self.serialized, self.strategy, self.static_input = serialized, strategy, static_input
        self.block_size = block_size
        self.dequantized = False

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        self.params_dtype = params_dtype
        size = intermediate_size_per_partition
        self._check_block_boundaries(layer, size)
        dtype = FP8_DTYPE if self.serialized else params_dtype
        layer.w13_weight = layer.make_param(torch.empty(num_experts, 2 * size, hidden_size, dtype=dtype))
        layer.w2_weight = layer.make_param(torch.empty(num_experts, hidden_size, size, dtype=dtype))
        if not self.serialized:
            return
        if self.strategy == "block":
            block_n, block_k = self.block_size

            def load_blocks(param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
                layer.weight_loader(param, loaded, shard_id, expert_id, row_unit=block_n, col_unit=block_k)

            shapes = ((2 * -(-size // block_n), -(-hidden_size // block_k)),
                      (-(-hidden_size // block_n), -(-size // block_k)))
            layer.w13_weight_scale_inv, layer.w2_weight_scale_inv = (
                layer.make_param(torch.empty(num_experts, *shape, dtype=torch.float32), load_blocks)
                for shape in shapes)
        elif self.strategy == "channel":
            loader = _per_channel_loader(layer)
            layer.w13_weight_scale = layer.make_param(torch.empty(num_experts, 2 * size, dtype=torch.float32), loader)
            layer.w2_weight_scale = layer.make_param(torch.empty(num_experts, hidden_size, dtype=torch.float32),
                                                     loader)
        else:
            loader = _per_tensor_loader(layer)
            layer.w13_weight_scale = layer.make_param(torch.ones(num_experts, 2, dtype=torch.float32), loader)
            layer.w2_weight_scale = layer.make_param(torch.ones(num_experts, 1, dtype=torch.float32), loader)
        if self.static_input:
            loader = _per_tensor_loader(layer)
            layer.w13_input_scale = layer.make_param(torch.zeros(num_experts, 2, dtype=torch.float32), loader)
            layer.w2_input_scale = layer.make_param(torch.zeros(num_experts, 1, dtype=torch.float32), loader)

    def _check_block_boundaries(self, layer: nn.Module, size: int) -> None:
        """A rank's I gate/up rows and I down columns start at rank * I: whole blocks only if I is a multiple
        of both block dims (one rank may hold a partial last block, as the checkpoint does)."""
        if self.block_size is None or layer.tp_size == 1 or not (size % self.block_size[0] or
                                                                   size % self.block_size[1]):
            return
        raise ValueError(f"{layer.prefix}: the experts' intermediate size {size * layer.tp_size} split over "
                         f"tensor_parallel_size {layer.tp_size} gives {size} rows per rank, not a multiple of the "
                         f"FP8 weight block {list(self.block_size)} (quantization_config.weight_block_size): a "
                         "rank's block scales would cut through blocks; choose a tensor_parallel_size that keeps "
                         "whole blocks")

    def _weight_scales(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13's, w2's) scales as the kernels read them: blocks as loaded, anything else per channel."""
        if self.strategy == "block":
            return layer.w13_weight_scale_inv.data, layer.w2_weight_scale_inv.data
        w13, w2 = layer.w13_weight_scale.data, layer.w2_weight_scale.data
        if self.strategy == "tensor":  # each matrix's scale over its rows
            w13 = w13.repeat_interleave(layer.intermediate_size_per_partition, dim=1)
            w2 = w2.expand(-1, layer.w2_weight.shape[1])
        return w13.float().contiguous(), w2.float().contiguous()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.serialized:
            w13, w2 = layer.w13_weight.data, layer.w2_weight.data
            scale13, scale2 = self._weight_scales(layer)
        else:
            (w13, scale13), (w2, scale2) = (self._quantize(w.data) for w in (layer.w13_weight, layer.w2_weight))
        for name in ("w13_weight_scale_inv", "w2_weight_scale_inv", "w13_weight_scale", "w2_weight_scale",
                     "w13_input_scale", "w2_input_scale"):
            if hasattr(layer, name):
                setattr(layer, name, None)
        size, hidden_size = layer.intermediate_size_per_partition, w2.shape[1]
        if w13.device.type == "cpu":
            layer.w13_weight = nn.Parameter(_dequantize_per_expert(w13, scale13, self.block_size, size,
                                                                   self.params_dtype), requires_grad=False)
            layer.w2_weight = nn.Parameter(_dequantize_per_expert(w2, scale2, self.block_size, hidden_size,
                                                                  self.params_dtype), requires_grad=False)
            self.dequantized = True
            return
        check_fp8_device(w13.device)
        from tokenmill.layers.fused_moe_triton import Fp8ExpertWeights

        input_scales = (None, None)
        if self.static_input:
            input_scales = (layer.w13_input_scale.data.max().float(), layer.w2_input_scale.data.max().float())
        layer.w13_weight = nn.Parameter(w13, requires_grad=False)
        layer.w2_weight = nn.Parameter(w2, requires_grad=False)
        self.w13_fp8 = Fp8ExpertWeights(scale13, self.block_size, size, input_scales[0])
        self.w2_fp8 = Fp8ExpertWeights(scale2, self.block_size, hidden_size, input_scales[1])

    @staticmethod
    def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """16-bit experts [E, N, K] -> (e4m3 [E, N, K], per-channel scales [E, N]), one expert at a time."""
        q = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
        scale = torch.empty(weight.shape[:2], dtype=torch.float32, device=weight.device)
        for expert_id, rows in enumerate(weight):
            q[expert_id], scale[expert_id] = quantize_per_channel(rows)
        return q, scale

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        if self.dequantized:
            return super().apply(layer, x, topk_weights, topk_ids)
        from tokenmill.layers.fused_moe_triton import fused_experts

        return fused_experts(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, w13_bias=layer.w13_bias,
                             w2_bias=layer.w2_bias, activation=layer.activation,
                             some_held_elsewhere=layer.expert_parallel, w13_fp8=self.w13_fp8, w2_fp8=self.w2_fp8)
