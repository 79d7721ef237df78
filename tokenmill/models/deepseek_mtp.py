"""DeepSeek-V3's multi-token-prediction (MTP) module as a draft head (vLLM's `deepseek_mtp`), in the layout the
checkpoint stores it: layer index N = num_hidden_layers of the target's own checkpoint (N + 1 ... for further
MTP modules, per num_nextn_predict_layers).

    model.layers.N.embed_tokens       the embedding (DeepSeek-V3 ships a copy; the target's where absent)
    model.layers.N.enorm, .hnorm      RMSNorms of the token's embedding and of the hidden state
    model.layers.N.eh_proj            [H, 2H], no bias
    model.layers.N.<decoder layer>    a full decoder layer (MLA attention, MoE past first_k_dense_replace)
    model.layers.N.shared_head.norm   the final norm, then
    model.layers.N.shared_head.head   the LM head (the target's where absent)

Reading token t + 1 at position t beside the hidden state h_t (the target's output there, after its final norm,
or the module's own output of the depth before), as vLLM orders it:

    e = embed(token), zeroed at position 0       (vLLM's masking of position 0, kept so proposals match)
    x = eh_proj(enorm(e) ++ hnorm(h_t))
    x, residual = layer(x, residual None)
    h' = x + residual                            the next depth's hidden state
    logits = head(shared_head.norm(h'))

The module is applied k times in a chain by the EAGLE proposer (spec_decode/eagle.py), its layer attending over
its own latent KV pool. Only the first MTP module (layer N) is built: a checkpoint with more MTP modules uses its
first at every depth.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tokenmill.layers.layernorm import RMSNorm
from tokenmill.layers.linear import ColumnParallelLinear
from tokenmill.models.deepseek_v2 import DeepseekV2ForCausalLM
from tokenmill.models.llama_eagle import DraftHead

# The module's own tensors (others under model.layers.N. are its decoder layer's) -> this head's names.
_OWN_NAMES = {"embed_tokens.": "embed_tokens.", "enorm.": "enorm.", "hnorm.": "hnorm.", "eh_proj.": "eh_proj.",
              "shared_head.head.": "lm_head.", "shared_head.norm.": "norm."}


def mtp_parameter_name(checkpoint_name: str, layer_index: int) -> str | None:
    """The head's parameter name of a checkpoint tensor of MTP layer `layer_index`; None for any other tensor."""
    prefix = f"model.layers.{layer_index}."
    if not checkpoint_name.startswith(prefix) or "rotary_emb.inv_freq" in checkpoint_name:
        return None
    name = checkpoint_name.removeprefix(prefix)
    own = next((piece for piece in _OWN_NAMES if name.startswith(piece)), None)
    return _OWN_NAMES[own] + name.removeprefix(own) if own is not None else f"mtp_block.{name}"


class DeepseekMTPHead(DraftHead):
    """The first MTP module (see the module docstring)."""

    packed_modules = DeepseekV2ForCausalLM.packed_modules
    expert_shards = DeepseekV2ForCausalLM.expert_shards

    def __init__(self, config: Any, max_position: int, quant_config: None, *, target: DeepseekV2ForCausalLM,
                 checkpoint_names: set[str]) -> None:
        """checkpoint_names: the head's parameter names the checkpoint holds (mtp_parameter_name); quant_config:
        None (DeepSeek checkpoints load unquantized); the signature is load_model's model_cls."""
        super().__init__(config, target, checkpoint_names)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.layer_index = config.num_hidden_layers
        self.enorm = RMSNorm(hidden, eps)
        self.hnorm = RMSNorm(hidden, eps)
        self.eh_proj = ColumnParallelLinear(2 * hidden, hidden, bias=False, gather_output=True, prefix="eh_proj")
        self.mtp_block = target.model.layer_cls(config, max_position, None, f"model.layers.{self.layer_index}")
        self.norm = RMSNorm(hidden, eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                from_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the LM head reads, the next depth's hidden state), both [n, hidden_size]; hidden_states is the
        target's output or the previous depth's h' (the module reads either the same way)."""
        embeds = self.embed_tokens(input_ids).masked_fill((positions == 0).unsqueeze(-1), 0)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden_states)], dim=-1))
        x, residual = self.mtp_block(positions, x, None)
        return self.norm(x, residual)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies the MTP layer's tensors out of the whole checkpoint (the target's are skipped unread: they are
        memory-mapped); returns the names of the parameters loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set(self.shared)
        for checkpoint_name, tensor in weights:
            name = mtp_parameter_name(checkpoint_name, self.layer_index)
            if name is not None:
                loaded.add(self._load_tensor(params, name, tensor))
        return loaded
