"""Mixture of experts: a router picks each token's top-k experts, each expert is a SiLU-gated MLP, and the
token's output is the experts' outputs weighted by the router.

    router_logits [T, E] --softmax, top-k, renormalized if asked--> topk_weights, topk_ids [T, k]
    x [T, H] --w13[e] [2I, H]--> [gate | up] --silu(gate) * up--> [T, I] --w2[e] [H, I]--> x weight, sum over k

Options for GPT-OSS: biases on both projections (w13_bias [E, 2I], w2_bias [E, H]; the down projection's
bias is added by tensor-parallel rank 0 only, as the ranks' outputs are summed) and the activation
"swigluoai", a clamped SwiGLU: gate clamped above at 7, up to [-7, 7], (up + 1) * gate * sigmoid(1.702 gate).

DeepSeek's routers (select_experts' keyword arguments): V3 scores with a sigmoid and chooses by the scores
plus a learned `e_score_correction_bias`, weighting by the scores without it; both may limit a token to its
`topk_group` best of `num_expert_group` expert groups (V2: a group's best score, V3 with the bias: the sum of
its best two) before the top-k, and scale the weights by `routed_scaling_factor`.

FusedMoE holds all experts' matrices stacked (w13: [E, 2I, H], gate rows then up rows; w2: [E, H, I]). On the
GPU the (token, expert) pairs are sorted by expert and each projection is one grouped GEMM over all experts
(fused_moe_triton); on the CPU a loop over the experts that have tokens. Tensor parallelism splits every
expert's intermediate dim, like a column-parallel gate/up and a row-parallel down: w13's rows and w2's columns
of this rank, one all-reduce after the down projection.

Expert parallelism (`enable_expert_parallel`) instead gives each of the ep ranks (the tensor-parallel group,
distributed/parallel_state.py) E / ep whole experts, rank r experts [r * E / ep, (r + 1) * E / ep):

    every rank: the same tokens x [T, H] (attention is tensor-parallel) -> the same router top-k
    rank r:     pairs of its experts -> local ids 0 .. E/ep - 1; the others -> E/ep, "held elsewhere", no rows
                -> its experts' weighted outputs [T, H] (zero for a token none of whose experts it holds)
    combine:    one all-reduce over the group sums each token's k outputs from their owners

The ranks already hold every token, so dispatch needs no all-to-all: each rank computes its experts' share of
all tokens and the all-reduce that tensor parallelism ends with combines them; no pair is computed twice, and
the communication is the same [T, H] all-reduce. Loading copies a checkpoint expert into its owner only.

Over data-parallel cores (data_parallel_size x tensor_parallel_size ranks, parallel_state.py) the ranks hold
different tokens, so they exchange them (_forward_all_to_all):

    each rank:  its tokens (a core's tensor-parallel ranks share its tokens: rank t takes the t-th slice)
                -> router top-k -> one row per (token, rank holding any of its experts), by rank
    dispatch:   all-to-all of the rows, with their k local expert ids (E / ep, held elsewhere, for the experts
                of other ranks) and router weights; the counts are exchanged first
    experts:    the received rows as any step's tokens: each through its experts there, weighted and summed
    combine:    all-to-all back, each token's rows (one per rank it went to) summed; the core's tensor-parallel
                ranks gather their slices
    A token whose k experts are on fewer than k ranks travels once per rank, not once per expert.

How the experts' matrices are stored and multiplied is FusedMoE's `quant_method` (a MoEMethod, as a linear
layer's is its LinearMethod): UnquantizedMoEMethod below, or the one the checkpoint's quantization config
names (FP8: quantization/fp8_moe.py). Checkpoint tensors reach FusedMoE expert by expert, scales by the same
names as the weights (`experts.<e>.gate_proj.weight_scale_inv` -> w13_weight_scale_inv).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import EP_RANKS
from tokenmill.distributed.parallel_state import (
    ep_all_to_all,
    ep_exchanges_tokens,
    get_ep_rank,
    get_ep_size,
    get_tp_rank,
    get_tp_size,
    tp_all_gather,
    tp_all_reduce,
)
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


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool, *, scoring_func: str = "softmax",
                   num_expert_group: int | None = None, topk_group: int | None = None,
                   e_score_correction_bias: torch.Tensor | None = None, routed_scaling_factor: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64): the k largest scores (softmax
    or sigmoid, in float32 as HF computes them), rescaled to sum to 1 when `renormalize` (Mixtral always,
    Qwen3-MoE and DeepSeek per `norm_topk_prob`), then times routed_scaling_factor. With a correction bias the
    experts are chosen by score + bias; with groups, only among the topk_group best groups. On the GPU, softmax
    top-k without groups or bias is one launch (fused_moe_triton.softmax_topk), not five."""
    if router_logits.is_cuda and scoring_func == "softmax" and (num_expert_group or 1) == 1 \
            and e_score_correction_bias is None and router_logits.stride(1) == 1:
        from tokenmill.layers.fused_moe_triton import softmax_topk

        return softmax_topk(router_logits, top_k, renormalize, routed_scaling_factor)
    if scoring_func == "softmax":
        scores = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    elif scoring_func == "sigmoid":
        scores = router_logits.float().sigmoid()
    else:
        raise ValueError(f"unsupported MoE scoring function {scoring_func!r} (supported: softmax, sigmoid)")
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if num_expert_group is not None and num_expert_group > 1:
        grouped = choice.view(choice.shape[0], num_expert_group, -1)
        if e_score_correction_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best_groups = group_scores.topk(topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        choice = grouped.masked_fill(~allowed[..., None], float("-inf")).view_as(choice)
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * routed_scaling_factor if routed_scaling_factor != 1.0 else weights), ids


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
    index_add_, which costs milliseconds per call on the CPU). An id of E (w13.shape[0]) is a pair whose
    expert another rank holds: its row is zero."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.flatten()
    pairs_by_expert = flat_ids.argsort(stable=True)  # pair = token * top_k + slot; those held elsewhere last
    counts = torch.bincount(flat_ids, minlength=num_experts + 1).tolist()[:num_experts]
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
    pair_out[pairs_by_expert[start:]] = 0
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
                                 w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, activation=layer.activation,
                                 some_held_elsewhere=layer.expert_parallel)
        return experts_loop(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, layer.w13_bias,
                            layer.w2_bias, layer.activation)


class FusedMoE(nn.Module):
    """One MoE layer's experts held by this rank: forward(x [T, H], router_logits [T, E]) -> [T, H], summed
    over the tensor-parallel ranks. Without expert parallelism a rank holds every expert's slice of the
    intermediate dim; with it, experts [first_expert, first_expert + num_local_experts) whole. `quant_config`:
    the checkpoint's weight format, which picks the experts' method."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 prefix: str = "", has_bias: bool = False, activation: str = "silu",
                 quant_config: QuantizationConfig | None = None, **routing: Any) -> None:
        """routing: select_experts' keyword arguments (DeepSeek's routers)."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"{prefix}: unknown experts' activation {activation!r} (known: {ACTIVATIONS})")
        self.routing = routing
        ep_size = get_ep_size()
        if num_experts % ep_size:
            raise ValueError(f"{prefix}: enable_expert_parallel spreads the experts over the "
                             f"{EP_RANKS[ep_exchanges_tokens()]} ranks; the layer's {num_experts} experts are not "
                             f"divisible by {ep_size}")
        # An expert-parallel rank holds whole experts; tensor parallelism alone splits each one.
        split, self.tp_rank = (1, 0) if ep_size > 1 else (get_tp_size(), get_tp_rank())
        self.tp_size = split  # the ranks each expert's intermediate dim is split over
        if intermediate_size % split:
            raise ValueError(f"{prefix}: the experts' intermediate size {intermediate_size} is not divisible by "
                             f"tensor_parallel_size {split}")
        self.num_experts, self.top_k, self.renormalize, self.prefix = num_experts, top_k, renormalize, prefix
        self.expert_parallel, self.num_local_experts = ep_size > 1, num_experts // ep_size
        self.first_expert = get_ep_rank() * self.num_local_experts
        self.intermediate_size_per_partition = size = intermediate_size // split
        local = self.num_local_experts
        self.activation = activation
        self.quant_method = (quant_config.get_moe_method(self, prefix) if quant_config is not None
                             else UnquantizedMoEMethod())
        self.quant_method.create_weights(self, local, hidden_size, size, torch.get_default_dtype())
        self.w13_bias = self.make_param(torch.empty(local, 2 * size)) if has_bias else None
        self.w2_bias = self.make_param(torch.empty(local, hidden_size)) if has_bias else None

    def make_param(self, data: torch.Tensor, weight_loader: WeightLoader | None = None) -> nn.Parameter:
        """A parameter loaded through `weight_loader` (default: this layer's, for weights and biases)."""
        param = nn.Parameter(data, requires_grad=False)
        param.weight_loader = weight_loader or self.weight_loader
        return param

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int,
                      row_unit: int = 1, col_unit: int = 1) -> None:
        """Copies this rank's slice of one expert's checkpoint matrix: w1 (gate) or w3 (up), [I, H], into
        the first or second half of w13's rows; w2 (down), [H, I], into w2. Biases the same way: w1/w3's [I]
        into w13_bias, w2's [H] whole into w2_bias on rank 0 (zeros on the others; an expert-parallel rank holds
        its experts whole, biases included). An expert another rank holds is not read (a memory-mapped
        checkpoint's pages of it stay untouched). row_unit x col_unit: the rows and columns one entry stands for
        (1 for a matrix, the block for block scales, whose gate and up halves each hold ceil(I / row_unit)
        rows)."""
        local_id = self.local_expert(expert_id)
        if local_id is None:
            return
        size = self.intermediate_size_per_partition
        start = self.tp_rank * size
        if shard_id == "w2" and loaded.dim() == 1:
            target, source = param.data[local_id], loaded if self.tp_rank == 0 else torch.zeros_like(loaded)
        elif shard_id == "w2":
            target, source = param.data[local_id], loaded.narrow(1, start // col_unit, -(-size // col_unit))
        else:
            half, rows = {"w1": 0, "w3": 1}[shard_id], -(-size // row_unit)
            target = param.data[local_id].narrow(0, half * rows, rows)
            source = loaded.narrow(0, start // row_unit, rows)
        if target.shape != source.shape:
            raise ValueError(f"shape mismatch loading {self.prefix} expert {expert_id} {shard_id}: parameter slice "
                             f"{tuple(target.shape)}, checkpoint {tuple(loaded.shape)}")
        target.copy_(source)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor,
                e_score_correction_bias: torch.Tensor | None = None) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize,
                                                e_score_correction_bias=e_score_correction_bias, **self.routing)
        if ep_exchanges_tokens():
            return self._forward_all_to_all(x, topk_weights, topk_ids)
        if self.expert_parallel:
            topk_ids = self.local_expert_ids(topk_ids)
        return tp_all_reduce(self.quant_method.apply(self, x, topk_weights, topk_ids))

    def _forward_all_to_all(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                            ) -> torch.Tensor:
        """Expert parallelism over data-parallel cores: this rank's tokens to their experts' ranks and back."""
        num_tokens, tp, tp_rank = x.shape[0], get_tp_size(), get_tp_rank()
        rows = -(-num_tokens // tp)  # this tensor-parallel rank's slice of the core's tokens
        start, end = min(num_tokens, tp_rank * rows), min(num_tokens, (tp_rank + 1) * rows)
        x, topk_weights, topk_ids = x[start:end], topk_weights[start:end], topk_ids[start:end]
        owners = topk_ids // self.num_local_experts
        goes = torch.zeros(x.shape[0], get_ep_size(), dtype=torch.bool, device=x.device).scatter_(1, owners, True)
        destination, token = goes.t().nonzero(as_tuple=True)  # one row per (rank, token), by rank
        held = owners[token] == destination.unsqueeze(1)  # of the row's k experts, those its rank holds
        ids = torch.where(held, topk_ids[token] % self.num_local_experts, self.num_local_experts)
        send_counts = goes.sum(0).tolist()
        received, recv_counts = ep_all_to_all(x[token], send_counts)
        recv_ids, _ = ep_all_to_all(ids, send_counts, recv_counts)
        recv_weights, _ = ep_all_to_all(topk_weights[token], send_counts, recv_counts)
        out = self.quant_method.apply(self, received, recv_weights, recv_ids) if received.shape[0] else received
        returned, _ = ep_all_to_all(out, recv_counts, send_counts)
        combined = x.new_zeros((rows, x.shape[1])).index_add_(0, token, returned)
        return tp_all_gather(combined, dim=0)[:num_tokens] if tp > 1 else combined[:num_tokens]

    def local_expert(self, expert_id: int) -> int | None:
        """The index among this rank's experts of checkpoint expert `expert_id`, None if another rank holds it."""
        local_id = expert_id - self.first_expert
        return local_id if 0 <= local_id < self.num_local_experts else None

    def local_expert_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids [T, k] -> this rank's (0 .. num_local_experts - 1), or num_local_experts for an
        expert another rank holds."""
        local_ids = topk_ids - self.first_expert
        held = (local_ids >= 0) & (local_ids < self.num_local_experts)
        return torch.where(held, local_ids, self.num_local_experts)


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
