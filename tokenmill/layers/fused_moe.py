"""Mixture of experts: a router picks each token's top-k experts, each expert is a SiLU-gated MLP, and the
token's output is the experts' outputs weighted by the router.

    router_logits [T, E] --softmax, top-k, renormalized if asked--> topk_weights, topk_ids [T, k]
    x [T, H] --w13[e] [2I, H]--> [gate | up] --silu(gate) * up--> [T, I] --w2[e] [H, I]--> x weight, sum over k

DeepSeek's routers (select_experts' keyword arguments): V3 scores with a sigmoid and chooses by the scores
plus a learned `e_score_correction_bias`, weighting by the scores without it; both may limit a token to its
`topk_group` best of `num_expert_group` expert groups (V2: a group's best score, V3 with the bias: the sum of
its best two) before the top-k, and scale the weights by `routed_scaling_factor`.

FusedMoE holds all experts' matrices stacked (w13: [E, 2I, H], gate rows then up rows; w2: [E, H, I]). On the
GPU the (token, expert) pairs are sorted by expert and each projection is one grouped GEMM over all experts
(fused_moe_triton); on the CPU a loop over the experts that have tokens. Tensor parallelism splits every
expert's intermediate dim, like a column-parallel gate/up and a row-parallel down: w13's rows and w2's columns
of this rank, one all-reduce after the down projection.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from tokenmill.layers.quantization import QuantizationConfig

# A checkpoint's matrix of one expert: "<block>.experts.<expert id>.<projection>.weight"
_EXPERT_WEIGHT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def expert_weight_target(name: str, shard_ids: dict[str, str]) -> tuple[str, str, int] | None:
    """(FusedMoE parameter name, shard id, expert id) of a checkpoint expert matrix, or None if `name` is not
    one. `shard_ids` maps the checkpoint's projection names to "w1" (gate), "w3" (up) and "w2" (down)."""
    match = _EXPERT_WEIGHT.match(name)
    if match is None or match.group(3) not in shard_ids:
        return None
    experts, expert_id, projection = match.groups()
    shard_id = shard_ids[projection]
    return f"{experts}.{'w2' if shard_id == 'w2' else 'w13'}_weight", shard_id, int(expert_id)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool, *, scoring_func: str = "softmax",
                   num_expert_group: int | None = None, topk_group: int | None = None,
                   e_score_correction_bias: torch.Tensor | None = None, routed_scaling_factor: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64): the k largest scores (softmax
    or sigmoid, in float32 as HF computes them), rescaled to sum to 1 when `renormalize` (Mixtral always,
    Qwen3-MoE and DeepSeek per `norm_topk_prob`), then times routed_scaling_factor. With a correction bias the
    experts are chosen by score + bias; with groups, only among the topk_group best groups."""
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
    return weights * routed_scaling_factor, ids


def experts_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
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
        gate, up = F.linear(x[pairs // top_k], w13[expert_id]).chunk(2, dim=-1)
        pair_out[pairs] = (F.linear(F.silu(gate) * up, w2[expert_id]) * flat_weights[pairs, None]).to(x.dtype)
    return pair_out.view(num_tokens, top_k, -1).sum(dim=1)


class FusedMoE(nn.Module):
    """Every expert of one MoE layer: forward(x [T, H], router_logits [T, E]) -> [T, H], summed over the
    tensor-parallel ranks."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 prefix: str = "", **routing: Any) -> None:
        """routing: select_experts' keyword arguments (DeepSeek's routers)."""
        super().__init__()
        self.routing = routing
        tp_size = get_tp_size()
        if intermediate_size % tp_size:
            raise ValueError(f"{prefix}: the experts' intermediate size {intermediate_size} is not divisible by "
                             f"tensor_parallel_size {tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.tp_rank, self.prefix = get_tp_rank(), prefix
        self.intermediate_size_per_partition = size = intermediate_size // tp_size
        self.w13_weight = self._param(torch.empty(num_experts, 2 * size, hidden_size))
        self.w2_weight = self._param(torch.empty(num_experts, hidden_size, size))

    def _param(self, data: torch.Tensor) -> nn.Parameter:
        param = nn.Parameter(data, requires_grad=False)
        param.weight_loader = self.weight_loader
        return param

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        """Copies this rank's slice of one expert's checkpoint matrix: w1 (gate) or w3 (up), [I, H], into
        the first or second half of w13's rows; w2 (down), [H, I], into w2."""
        size = self.intermediate_size_per_partition
        start = self.tp_rank * size
        if shard_id == "w2":
            target, source = param.data[expert_id], loaded.narrow(1, start, size)
        else:
            half = {"w1": 0, "w3": 1}[shard_id]
            target, source = param.data[expert_id].narrow(0, half * size, size), loaded.narrow(0, start, size)
        if target.shape != source.shape:
            raise ValueError(f"shape mismatch loading {self.prefix} expert {expert_id} {shard_id}: parameter slice "
                             f"{tuple(target.shape)}, checkpoint {tuple(loaded.shape)}")
        target.copy_(source)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor,
                e_score_correction_bias: torch.Tensor | None = None) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize,
                                                e_score_correction_bias=e_score_correction_bias, **self.routing)
        if x.is_cuda:
            from tokenmill.layers.fused_moe_triton import fused_experts

            out = fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        else:
            out = experts_loop(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return tp_all_reduce(out)


class SparseMoeBlock(nn.Module):
    """A sparse MoE MLP as Qwen3-MoE and Mixtral have it: a router `gate` (a [E, H] matrix, on every rank)
    and the `experts`."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError(f"{prefix}: quantized experts are not supported ({quant_config.name})")
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize,
                                f"{prefix}.experts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
