"""Mixture of experts: a router picks each token's top-k experts, each expert is a SiLU-gated MLP, and the
token's output is the experts' outputs weighted by the router.

    router_logits [T, E] --softmax, top-k, renormalized if asked--> topk_weights, topk_ids [T, k]
    x [T, H] --w13[e] [2I, H]--> [gate | up] --silu(gate) * up--> [T, I] --w2[e] [H, I]--> x weight, sum over k

Options for GPT-OSS: biases on both projections (w13_bias [E, 2I], w2_bias [E, H]; the down projection's
bias is added by tensor-parallel rank 0 only, as the ranks' outputs are summed) and the activation
"swigluoai", a clamped SwiGLU: gate clamped above at 7, up to [-7, 7], (up + 1) * gate * sigmoid(1.702 gate).

FusedMoE holds all experts' matrices stacked (w13: [E, 2I, H], gate rows then up rows; w2: [E, H, I]). On the
GPU the (token, expert) pairs are sorted by expert and each projection is one grouped GEMM over all experts
(fused_moe_triton); on the CPU a loop over the experts that have tokens. Tensor parallelism splits every
expert's intermediate dim, like a column-parallel gate/up and a row-parallel down: w13's rows and w2's columns
of this rank, one all-reduce after the down projection.

How the experts' matrices are stored and multiplied is FusedMoE's `quant_method` (a MoEMethod, as a linear
layer's is its LinearMethod): UnquantizedMoEMethod below, or the one the checkpoint's quantization config
names (FP8: quantization/fp8_moe.py). Checkpoint tensors reach FusedMoE expert by expert, scales by the same
names as the weights (`experts.<e>.gate_proj.weight_scale_inv` -> w13_weight_scale_inv).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from tokenmill.layers.quantization import MoEMethod, QuantizationConfig
from tokenmill.layers.quantization.base import WeightLoader

# A checkpoint's matrix of one expert, or one of its scales: "<block>.experts.<expert id>.<projection>.<kind>"
_EXPERT_WEIGHT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.(weight|weight_scale_inv|weight_scale|input_scale)$")


def expert_weight_target(name: str, shard_ids: dict[str, str]) -> tuple[str, str, int] | None:
    """(FusedMoE parameter name, shard id, expert id) of a checkpoint expert matrix or scale, or None if `name`
    is not one. `shard_ids` maps the checkpoint's projection names to "w1" (gate), "w3" (up) and "w2" (down)."""
    match = _EXPERT_WEIGHT.match(name)
    if match is None or match.group(3) not in shard_ids:
        return None
    experts, expert_id, projection, kind = match.groups()
    shard_id = shard_ids[projection]
    return f"{experts}.{'w2' if shard_id == 'w2' else 'w13'}_{kind}", shard_id, int(expert_id)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64): the softmax's k largest
    probabilities (in float32, as HF computes them), rescaled to sum to 1 when `renormalize` (Mixtral always,
    Qwen3-MoE per `norm_topk_prob`)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
ACTIVATIONS = ("silu", "swigluoai")


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU of the gate and up projections' outputs."""
    gate = gate.clamp(max=SWIGLU_LIMIT)
    up = up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
    return (up + 1) * gate * torch.sigmoid(gate * SWIGLU_ALPHA)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """[..., 2I] = [gate | up] -> [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up if activation == "silu" else swiglu_oai(gate, up)


def experts_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                 activation: str = "silu") -> torch.Tensor:
    """The experts on the CPU: x [T, H] -> [T, H], one pair of matmuls per expert that has tokens. Each
    (token, slot) pair's weighted output gets its own row, and a token's k rows are summed last (not
    index_add_, which costs milliseconds per call on the CPU)."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.flatten()
    pairs_by_expert = flat_ids.argsort(stable=True)  # pair = token * top_k + slot
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    flat_weights = topk_weights.flatten()
    pair_out = torch.empty(num_tokens * top_k, x.shape[1], dtype=x.dtype)
    start = 0
    for expert_id, count in enumerate(counts):
        if count == 0:
            continue
        pairs = pairs_by_expert[start:start + count]
        start += count
        biases = (None, None) if w13_bias is None else (w13_bias[expert_id], w2_bias[expert_id])
        hidden = gated_activation(F.linear(x[pairs // top_k], w13[expert_id], biases[0]), activation)
        pair_out[pairs] = (F.linear(hidden, w2[expert_id], biases[1]) * flat_weights[pairs, None]).to(x.dtype)
    return pair_out.view(num_tokens, top_k, -1).sum(dim=1)


class UnquantizedMoEMethod(MoEMethod):
    """Experts in the model's dtype: the grouped GEMM on the GPU, experts_loop on the CPU."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        size = intermediate_size_per_partition
        layer.w13_weight = layer.make_param(torch.empty(num_experts, 2 * size, hidden_size, dtype=params_dtype))
        layer.w2_weight = layer.make_param(torch.empty(num_experts, hidden_size, size, dtype=params_dtype))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing: the stacked layout is the one both paths read."""

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from tokenmill.layers.fused_moe_triton import fused_experts

            return fused_experts(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                                 w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, activation=layer.activation)
        return experts_loop(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, layer.w13_bias,
                            layer.w2_bias, layer.activation)


class FusedMoE(nn.Module):
    """Every expert of one MoE layer: forward(x [T, H], router_logits [T, E]) -> [T, H], summed over the
    tensor-parallel ranks. `quant_config`: the checkpoint's weight format, which picks the experts' method."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 prefix: str = "", has_bias: bool = False, activation: str = "silu",
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"{prefix}: unknown experts' activation {activation!r} (known: {ACTIVATIONS})")
        tp_size = get_tp_size()
        if intermediate_size % tp_size:
            raise ValueError(f"{prefix}: the experts' intermediate size {intermediate_size} is not divisible by "
                             f"tensor_parallel_size {tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.tp_rank, self.tp_size, self.prefix = get_tp_rank(), tp_size, prefix
        self.intermediate_size_per_partition = size = intermediate_size // tp_size
        self.activation = activation
        self.quant_method = (quant_config.get_moe_method(self, prefix) if quant_config is not None
                             else UnquantizedMoEMethod())
        self.quant_method.create_weights(self, num_experts, hidden_size, size, torch.get_default_dtype())
        self.w13_bias = self.make_param(torch.empty(num_experts, 2 * size)) if has_bias else None
        self.w2_bias = self.make_param(torch.empty(num_experts, hidden_size)) if has_bias else None

    def make_param(self, data: torch.Tensor, weight_loader: WeightLoader | None = None) -> nn.Parameter:
        """A parameter loaded through `weight_loader` (default: this layer's, for weights and biases)."""
        param = nn.Parameter(data, requires_grad=False)
        param.weight_loader = weight_loader or self.weight_loader
        return param

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int,
                      row_unit: int = 1, col_unit: int = 1) -> None:
        """Copies this rank's slice of one expert's checkpoint matrix: w1 (gate) or w3 (up), [I, H], into
        the first or second half of w13's rows; w2 (down), [H, I], into w2. Biases the same way: w1/w3's [I]
        into w13_bias, w2's [H] whole into w2_bias on rank 0 (zeros on the others). row_unit x col_unit: the
        rows and columns one entry stands for (1 for a matrix, the block for block scales, whose gate and up
        halves each hold ceil(I / row_unit) rows)."""
        size = self.intermediate_size_per_partition
        start = self.tp_rank * size
        if shard_id == "w2" and loaded.dim() == 1:
            target, source = param.data[expert_id], loaded if self.tp_rank == 0 else torch.zeros_like(loaded)
        elif shard_id == "w2":
            target, source = param.data[expert_id], loaded.narrow(1, start // col_unit, -(-size // col_unit))
        else:
            half, rows = {"w1": 0, "w3": 1}[shard_id], -(-size // row_unit)
            target = param.data[expert_id].narrow(0, half * rows, rows)
            source = loaded.narrow(0, start // row_unit, rows)
        if target.shape != source.shape:
            raise ValueError(f"shape mismatch loading {self.prefix} expert {expert_id} {shard_id}: parameter slice "
                             f"{tuple(target.shape)}, checkpoint {tuple(loaded.shape)}")
        target.copy_(source)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        return tp_all_reduce(self.quant_method.apply(self, x, topk_weights, topk_ids))


class SparseMoeBlock(nn.Module):
    """A sparse MoE MLP as Qwen3-MoE and Mixtral have it: a router `gate` (a [E, H] matrix, on every rank)
    and the `experts`."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize,
                                f"{prefix}.experts", quant_config=quant_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
