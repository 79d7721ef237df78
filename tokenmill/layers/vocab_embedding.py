"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks.

Each rank holds ceil(vocab / tp) rows, the last rank's tail zero-padded, so the ranks' logits gather into
equal slices; the padding columns are cut off after the gather."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from tokenmill.layers.linear import UnquantizedLinearMethod
from tokenmill.layers.quantization import QuantizationConfig


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, prefix: str = "") -> None:
        super().__init__()
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.shard_size
        self.num_rows = max(0, min(self.shard_size, vocab_size - self.vocab_start))  # the rest is padding
        rows = self.shard_size if self.tp_size > 1 else vocab_size
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"embedding shape mismatch: vocabulary {self.vocab_size} x {param.shape[1]}, "
                             f"checkpoint {tuple(loaded.shape)}")
        param.data[:self.num_rows].copy_(loaded.narrow(0, self.vocab_start, self.num_rows))
        param.data[self.num_rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local < 0) | (local >= self.num_rows)
        out = F.embedding(local.masked_fill(mask, 0), self.weight).masked_fill(mask.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the whole vocabulary (gathered across ranks). Its weight is
    the embedding's when the model ties them; its product runs through a linear method like any layer's."""

    def __init__(self, vocab_size: int, hidden_size: int, prefix: str = "",
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(vocab_size, hidden_size, prefix)
        method = quant_config.get_lm_head_method() if quant_config is not None else None
        self.linear_method = method or UnquantizedLinearMethod()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = tp_all_gather(self.linear_method.apply(self, hidden_states))
        return logits[..., :self.vocab_size] if self.tp_size > 1 else logits
