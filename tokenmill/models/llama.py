"""Llama-family decoder (Llama 2/3/3.1, SmolLM2, Mistral-style configs); Qwen2 and Qwen3 reuse it.

Module names follow the HF checkpoint, with q/k/v and gate/up packed into one matrix each; the
packed-modules table below maps checkpoint names onto those shards when loading.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenmill.forward_context import get_forward_context
from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.attention import Attention
from tokenmill.layers.layernorm import RMSNorm
from tokenmill.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tokenmill.layers.rotary import RotaryEmbedding, rope_parameters
from tokenmill.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    use_qk_norm = False

    @staticmethod
    def biases(config: Any) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        qkv_bias, o_bias = self.biases(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=o_bias)
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(self.head_dim, max_position, theta, scaling)
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, logits_only: bool = False) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        if qkv.is_cuda:  # one kernel: q/k norms and rotary in place on the projection, keys and values cached
            from tokenmill.layers.triton_ops import qk_norm_rope_inplace

            norms = dict(q_weight=self.q_norm.weight, k_weight=self.k_norm.weight,
                         eps=self.q_norm.eps) if self.use_qk_norm else {}
            qk_norm_rope_inplace(qkv, positions, self.rotary_emb.cos_cache, self.rotary_emb.sin_cache,
                                 self.num_heads, self.num_kv_heads, self.head_dim, **norms,
                                 kv_cache=self.attn.kv_cache, slot_mapping=get_forward_context().attn_metadata.slot_mapping)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        num_tokens = hidden_states.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not qkv.is_cuda:
            if self.use_qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, logits_only, kv_written=qkv.is_cuda))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, max_position)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                logits_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """With `logits_only`, rows past attention are only the forward context's logits_rows."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, logits_only)
        if logits_only:
            residual = residual[get_forward_context().logits_rows]
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(config, max_position) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states of every row, or only of the forward context's logits_rows when it sets them: the
        last layer then computes keys and values for every row, and the rest only for those rows."""
        hidden_states, residual = self.embed_tokens(input_ids), None
        logits_only = get_forward_context().logits_rows is not None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden_states, residual = layer(positions, hidden_states, residual, logits_only and i == last)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel
    # checkpoint name piece -> (packed parameter name piece, shard id)
    packed_modules = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, max_position)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size] (or
        [len(logits_rows), hidden_size], see LlamaModel.forward)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size]."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors into the parameters; returns the names of the parameters loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            for piece, (packed, shard_id) in self.packed_modules.items():
                if piece in name:
                    target = name.replace(piece, packed)
                    self._param(params, target, name).weight_loader(params[target], tensor, shard_id)
                    break
            else:
                target = name
                param = self._param(params, target, name)
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    if param.shape != tensor.shape:
                        raise ValueError(f"shape mismatch for {name}: {tuple(param.shape)} vs {tuple(tensor.shape)}")
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor)
            loaded.add(target)
        if self.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded

    @staticmethod
    def _param(params: dict[str, nn.Parameter], target: str, name: str) -> nn.Parameter:
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the model")
        return params[target]
