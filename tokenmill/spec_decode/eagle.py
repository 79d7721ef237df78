"""The EAGLE proposer: an EAGLE-1/2 or EAGLE-3 head (models/llama_eagle.py) proposes k tokens per request from
the target's hidden states, chain drafting as vLLM does. It is the draft-model proposer (draft_model.py) with
two differences: the head reads token t at position t - 1, beside the target's hidden state there, and its
later depths read the head's own hidden state of the depth before.

    target step: positions c .. c+m-1 computed        -> keep_hidden(): their hidden states, per request
    propose (the request sampled; n tokens now):
      catch-up  positions s-1 .. n-2, tokens s .. n-1, target hidden states of s-1 .. n-2  -> draft 1
      depth j   position n-2+j, token draft j, the head's hidden state of the row before   -> draft j+1

Positions past n-2 that the target computed held rejected drafts: their hidden states are dropped after the
proposal. The head's KV cache is one layer over the target's block ids (the scheduler reserves k lookahead
slots). A prefix-cache hit gives no target hidden states for the cached positions, so the catch-up starts at
the first position the target computed and the head's cached keys and values there are those of the request
that wrote the blocks (the blocks are shared, the head's pool with them).

The target exposes what the head reads at no cost when speculation is off: EAGLE-1 reads the target's
output (its last hidden state after the final norm, what its LM head reads); EAGLE-3 sets the target
LlamaModel's aux_hidden_state_layers, whose forward then keeps those layers' inputs.

DeepSeek-V3's MTP module (spec_decode/mtp.py) runs here as an EAGLE-1 head: it reads the same inputs (token
t at position t - 1, the target's output there, its own output at later depths).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from torch import nn

from tokenmill.config import EngineConfig
from tokenmill.loader.model_loader import load_model
from tokenmill.loader.registry import loader_class
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.llama_eagle import Eagle3LlamaHead, EagleLlamaHead, aux_layer_ids
from tokenmill.source import resolve_model
from tokenmill.spec_decode.draft_model import DraftModelProposer


def _refuse(message: str) -> None:
    raise ValueError(f"speculative_config.model {message}")


def load_eagle_head(config: EngineConfig, target: nn.Module, device: torch.device, dtype: torch.dtype
                    ) -> nn.Module:
    """The speculative_config's EAGLE (method "eagle") or EAGLE-3 ("eagle3") head for `target`; refuses a head
    that does not fit it. For EAGLE-3, also sets the target to keep the aux hidden states the head reads."""
    spec = config.speculative_config
    if not isinstance(target, LlamaForCausalLM):
        raise ValueError(f"speculative_config.method {spec.method!r} needs the target's hidden states, which "
                         f"{type(target).__name__} does not expose (EAGLE heads run on Llama-family targets)")
    source = resolve_model(spec.model)
    head_config, target_config = source.hf_config, target.config
    names = {name for name, _ in loader_class(source.format)(source, source.format).weights(dtype)}
    is_eagle3 = any("hidden_norm" in name for name in names)
    if is_eagle3 != (spec.method == "eagle3"):
        _refuse(f"{spec.model!r} is {'an EAGLE-3' if is_eagle3 else 'an EAGLE-1/2'} head (its layer "
                f"{'has' if is_eagle3 else 'has no'} hidden_norm); use method {'eagle3' if is_eagle3 else 'eagle'}")
    if head_config.vocab_size != target_config.vocab_size:
        _refuse(f"{spec.model!r} has a vocabulary of {head_config.vocab_size} tokens; the target's has "
                f"{target_config.vocab_size}")
    shares = {"embed_tokens.weight", "lm_head.weight"} - names
    target_hidden = getattr(head_config, "target_hidden_size", None) if is_eagle3 else None
    for what, size in (("hidden size", target_hidden or head_config.hidden_size),
                       ("hidden size (beside the target's embedding or LM head)",
                        head_config.hidden_size if shares else None)):
        if size is not None and size != target_config.hidden_size:
            _refuse(f"{spec.model!r} reads a {what} of {size}; the target's is {target_config.hidden_size}")
    if is_eagle3:
        num_layers = target_config.num_hidden_layers
        layer_ids = aux_layer_ids(head_config, num_layers)
        if any(not 0 <= i < num_layers for i in layer_ids):
            _refuse(f"{spec.model!r} reads the hidden states of layers {list(layer_ids)}; the target has "
                    f"{num_layers} layers")
        draft_vocab = Eagle3LlamaHead.draft_vocab_size(head_config)
        if draft_vocab != head_config.vocab_size and ("d2t" not in names or "lm_head.weight" not in names):
            _refuse(f"{spec.model!r} has a draft vocabulary of {draft_vocab} tokens but no 'd2t' map or LM head")
        target.model.aux_hidden_state_layers = layer_ids
        model_cls = functools.partial(Eagle3LlamaHead, target=target, checkpoint_names=names,
                                      num_aux_layers=len(layer_ids))
    else:
        model_cls = functools.partial(EagleLlamaHead, target=target, checkpoint_names=names)
    model_config = dataclasses.replace(config.model, max_model_len=config.scheduler.max_model_len,
                                       load_format="auto", quantization=None)
    return load_model(source, model_config, dtype, device, model_cls)


class EagleProposer(DraftModelProposer):
    token_shift = 1

    def __init__(self, config: EngineConfig, target: nn.Module, head: nn.Module, device: torch.device,
                 kv_cache_dtype: torch.dtype, backend) -> None:
        """head: load_eagle_head's, or spec_decode/mtp.py's MTP module (read as an EAGLE-1 head)."""
        super().__init__(config, head, device, kv_cache_dtype, backend)
        self.target = target
        self.eagle3 = isinstance(self.model, Eagle3LlamaHead)
        # request -> (first position, the target's hidden states from there on [positions, D]) not yet read
        self.hidden: dict[str, tuple[int, torch.Tensor]] = {}
        self.carry: torch.Tensor | None = None  # the last depth's hidden state per request, in propose() order

    @property
    def reads_all_rows(self) -> bool:
        """Whether the head reads the target's output at every row (EAGLE-1), so the target's last layer must
        compute them all; EAGLE-3 reads earlier layers'."""
        return not self.eagle3

    def features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the head reads of a target forward pass that returned hidden_states: those (the target's output)
        or, for EAGLE-3, the aux hidden states the pass kept, side by side."""
        return torch.cat(self.target.model.aux_hidden_states, dim=-1) if self.eagle3 else hidden_states

    def keep_hidden(self, req_ids: list[str], first_positions: np.ndarray, counts: np.ndarray,
                    features: torch.Tensor) -> None:
        """After a target forward pass over requests req_ids, counts[i] rows each from position
        first_positions[i], in that order: keeps the rows of its features() for the head."""
        offset = 0
        for req_id, first, count in zip(req_ids, first_positions.tolist(), counts.tolist()):
            rows = features[offset:offset + count]
            offset += count
            kept = self.hidden.get(req_id)
            if kept is not None and kept[0] <= first <= kept[0] + len(kept[1]):  # a prompt's next chunk
                rows = torch.cat([kept[1][:first - kept[0]], rows])
                first = kept[0]
            self.hidden[req_id] = (first, rows)

    def forget(self, req_id: str) -> None:
        super().forget(req_id)
        self.hidden.pop(req_id, None)

    def propose(self, batch, rows, meta) -> list[list[int]]:
        proposals = super().propose(batch, rows, meta)
        for r in rows:  # read up to the last token; any later rows held rejected drafts
            self.hidden.pop(batch.req_ids[r], None)
        return proposals

    def _catch_up_start(self, req_id: str, num_tokens: int) -> int:
        """Token s is read at position s - 1, so from the first position with the target's hidden state."""
        first_position = self.hidden[req_id][0]
        return min(max(self.computed.get(req_id, 0), first_position + 1), num_tokens - 1)

    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, spans: list[tuple[str, int, int]],
                   order: torch.Tensor, last: torch.Tensor, chained: bool) -> torch.Tensor:
        if chained:
            hidden_in = self.carry[order]
        else:
            parts = []
            for req_id, start, end in spans:
                first, kept = self.hidden[req_id]
                parts.append(kept[start - first:end - first])
            hidden_in = torch.cat(parts)
        for_logits, next_hidden = self.model(input_ids, positions, hidden_in, from_target=not chained)
        self.carry = torch.empty_like(next_hidden[last])
        self.carry[order] = next_hidden[last]
        return for_logits[last]
