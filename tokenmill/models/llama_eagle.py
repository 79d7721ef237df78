"""EAGLE draft heads for Llama-family targets, in their published checkpoint layouts: one decoder layer that
reads the token's embedding beside the target's hidden state at the position before it.

    EAGLE-1/2 (EagleLlamaHead; e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B):
        x = fc(embed(token) ++ h)                     fc.weight [H, 2H] (fc.bias if the checkpoint has one)
        x = layers.0(x)                               a Llama layer without input_layernorm
        logits = lm_head(x)                           no final norm; x is also the next depth's h
      h at the first depth: the target's last hidden state (after its final norm: what its LM head reads).

    EAGLE-3 (Eagle3LlamaHead; e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B, LlamaForCausalLMEagle3):
        h = fc(a_0 ++ a_1 ++ a_2)                     fc.weight [H, 3H]; only at the first depth, where h
                                                      is the target's aux hidden states (the residual
                                                      stream entering three layers, see aux_layer_ids)
        x = midlayer(input_layernorm(embed(token)) ++ hidden_norm(h), residual h)   qkv over 2H
        x, h' = norm(x + residual), x + residual      h' (before the norm) is the next depth's h
        logits = lm_head(x)                           over draft_vocab_size tokens; draft id i is target
                                                      id i + d2t[i] (t2d, the inverse map, is not needed)

Either head uses the target's embedding and LM head where its checkpoint has none (DraftHead, which DeepSeek's
MTP head shares). Its layer attends over its
own one-layer KV cache (spec_decode/eagle.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenmill.layers.layernorm import RMSNorm
from tokenmill.layers.linear import ColumnParallelLinear, QKVParallelLinear
from tokenmill.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from tokenmill.models.llama import LlamaDecoderLayer, LlamaForCausalLM, head_dim_of


def aux_layer_ids(head_config: Any, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose input hidden states an EAGLE-3 head reads: its config's
    eagle_aux_hidden_state_layer_ids, else vLLM's choice (2, N // 2, N - 3)."""
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None)
    if ids is None:
        ids = (2, num_target_layers // 2, num_target_layers - 3)
    return tuple(int(i) for i in ids)


class DraftHead(nn.Module):
    """What the draft heads share (both EAGLE heads here, DeepSeek's MTP head in models/deepseek_mtp.py): the
    embedding and LM head (their own or the target's) and loading by name."""

    # Loading borrows the target's name mapping (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
    packed_modules = LlamaForCausalLM.packed_modules
    expert_shards: dict[str, str] = {}
    _param = staticmethod(LlamaForCausalLM._param)
    _load_tensor = LlamaForCausalLM._load_tensor
    layer_prefix = "layers.0."  # the checkpoint's name for the head's one layer

    def __init__(self, config: Any, target: LlamaForCausalLM, checkpoint_names: set[str]) -> None:
        super().__init__()
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, "embed_tokens")
                             if "embed_tokens.weight" in checkpoint_names else target.model.embed_tokens)
        self.lm_head = (ParallelLMHead(self.draft_vocab_size(config), config.hidden_size, "lm_head")
                        if "lm_head.weight" in checkpoint_names else target.lm_head)
        # The target's modules this head uses as its own: loaded with the target.
        self.shared = {f"{name}.weight" for name in ("embed_tokens", "lm_head")
                       if f"{name}.weight" not in checkpoint_names}

    @staticmethod
    def draft_vocab_size(config: Any) -> int:
        return config.vocab_size

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, target vocab]."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies the head's checkpoint tensors into its parameters; returns the names of those loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set(self.shared)
        for name, tensor in weights:
            name = name.removeprefix("model.")
            for layer_name in ("midlayer.", "layers.0."):  # EAGLE-3 heads come with either name
                if name.startswith(layer_name):
                    name = self.layer_prefix + name.removeprefix(layer_name)
                    break
            if "rotary_emb.inv_freq" in name or name == "t2d":
                continue
            if name == "d2t":
                self.load_d2t(tensor)
                continue
            loaded.add(self._load_tensor(params, name, tensor))
        return loaded

    def load_d2t(self, tensor: torch.Tensor) -> None:
        raise ValueError("checkpoint tensor 'd2t' belongs to an EAGLE-3 head; use method 'eagle3'")


class EagleLlamaHead(DraftHead):
    """EAGLE-1/2 (see the module docstring)."""

    def __init__(self, config: Any, max_position: int, quant_config: None, *, target: LlamaForCausalLM,
                 checkpoint_names: set[str]) -> None:
        """quant_config: None (heads are unquantized); the signature is load_model's model_cls."""
        super().__init__(config, target, checkpoint_names)
        hidden = config.hidden_size
        self.fc = ColumnParallelLinear(2 * hidden, hidden, bias="fc.bias" in checkpoint_names, gather_output=True,
                                       prefix="fc")
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, max_position, None, "layers.0")])
        self.layers[0].input_layernorm = nn.Identity()  # EAGLE-1 checkpoints have none: fc's output goes in

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                from_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the LM head reads, the next depth's hidden state), both [n, hidden_size]; hidden_states is the
        target's last hidden state or the previous depth's (the same quantity: the head predicts the target's
        features)."""
        x = self.fc(torch.cat([self.embed_tokens(input_ids), hidden_states], dim=-1))
        x, residual = self.layers[0](positions, x, None)
        x = x + residual
        return x, x


class Eagle3DecoderLayer(LlamaDecoderLayer):
    """The EAGLE-3 midlayer: attention over the normed embedding ++ the normed hidden state (2H), the hidden
    state as the residual."""

    def __init__(self, config: Any, max_position: int, prefix: str) -> None:
        super().__init__(config, max_position, None, prefix)
        attn = self.self_attn
        self.self_attn.qkv_proj = QKVParallelLinear(2 * config.hidden_size, head_dim_of(config),
                                                    config.num_attention_heads, config.num_key_value_heads,
                                                    bias=attn.qkv_proj.bias is not None,
                                                    prefix=f"{prefix}.self_attn.qkv_proj")
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden_states: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden_states)], dim=-1)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3LlamaHead(DraftHead):
    """EAGLE-3 (see the module docstring)."""

    layer_prefix = "midlayer."

    def __init__(self, config: Any, max_position: int, quant_config: None, *, target: LlamaForCausalLM,
                 checkpoint_names: set[str], num_aux_layers: int) -> None:
        super().__init__(config, target, checkpoint_names)
        self.fc = ColumnParallelLinear(num_aux_layers * target.config.hidden_size, config.hidden_size,
                                       bias="fc.bias" in checkpoint_names, gather_output=True, prefix="fc")
        self.midlayer = Eagle3DecoderLayer(config, max_position, "midlayer")
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.target_vocab_size = config.vocab_size
        # draft id -> target id; None when the head's LM head covers the target's whole vocabulary
        self.draft_to_target: torch.Tensor | None = None

    @staticmethod
    def draft_vocab_size(config: Any) -> int:
        return getattr(config, "draft_vocab_size", None) or config.vocab_size

    def load_d2t(self, tensor: torch.Tensor) -> None:
        num_draft = self.lm_head.vocab_size
        if tensor.shape != (num_draft,):
            raise ValueError(f"checkpoint tensor 'd2t' has shape {tuple(tensor.shape)}; the head's draft "
                             f"vocabulary has {num_draft} tokens")
        device = self.fc.weight.device
        self.draft_to_target = torch.arange(num_draft, device=device) + tensor.to(device, torch.int64)
        if int(self.draft_to_target.min()) < 0 or int(self.draft_to_target.max()) >= self.target_vocab_size:
            raise ValueError(f"checkpoint tensor 'd2t' maps draft ids outside the target's vocabulary of "
                             f"{self.target_vocab_size} tokens")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                from_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the LM head reads, the next depth's hidden state); hidden_states is the target's aux hidden
        states [n, 3 * target hidden] (from_target) or the previous depth's [n, hidden_size]."""
        if from_target:
            hidden_states = self.fc(hidden_states)
        x, residual = self.midlayer(positions, self.embed_tokens(input_ids), hidden_states)
        return self.norm(x, residual)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, target vocab]: the draft vocabulary's logits at their target ids, -inf at
        the ids the head cannot propose."""
        logits = self.lm_head.compute_logits(hidden_states)
        if self.draft_to_target is None:
            return logits
        full = logits.new_full((logits.shape[0], self.target_vocab_size), float("-inf"))
        full[:, self.draft_to_target] = logits
        return full
