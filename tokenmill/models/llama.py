"""Llama-family decoder (Llama 2/3/3.1, SmolLM2, Mistral-style configs); Qwen2 and Qwen3 reuse it.

Module names follow the HF checkpoint, with q/k/v and gate/up packed into one matrix each; the
packed-modules table below maps checkpoint names onto those shards when loading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenmill.distributed.parallel_state import (
    get_pp_rank,
    get_pp_size,
    is_first_stage,
    is_last_stage,
    pp_recv,
    pp_send,
)
from tokenmill.forward_context import get_forward_context
from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.attention import Attention
from tokenmill.layers.fused_moe import expert_weight_target
from tokenmill.layers.layernorm import RMSNorm
from tokenmill.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tokenmill.layers.quantization import QuantizationConfig
from tokenmill.layers.rotary import get_rope, rope_parameters
from tokenmill.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


def pp_layer_range(num_layers: int) -> tuple[int, int]:
    """[start, end) of the layers this pipeline stage holds: an even split, the first stages one more where
    the layers do not divide."""
    size, rank = get_pp_size(), get_pp_rank()
    per, extra = divmod(num_layers, size)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


class PPMissingLayer(nn.Identity):
    """The place of a layer another pipeline stage holds: no parameters, never called."""


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: Any, layer_index: int) -> int | None:
    """The keys layer `layer_index` attends to (None: all), as HF builds its masks: per `layer_types` where
    the config lists them (GPT-OSS, and transformers 5's Qwen2/Qwen3 configs); otherwise Qwen2's rule, the
    window on the layers from `max_window_layers` on when `use_sliding_window`, and Mistral's, on every layer."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_index] == "sliding_attention" else None
    if not getattr(config, "use_sliding_window", True):
        return None
    return window if layer_index >= getattr(config, "max_window_layers", 0) else None


class LlamaAttention(nn.Module):
    use_qk_norm = False

    @staticmethod
    def biases(config: Any) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def __init__(self, config: Any, max_position: int, quant_config: QuantizationConfig | None, prefix: str,
                 is_last_layer: bool) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        qkv_bias, o_bias = self.biases(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        if self.use_qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        theta, scaling = rope_parameters(config)
        # "model.layers.<i>.self_attn"; an EAGLE-3 head's one "midlayer" is its layer 0
        layer_index = next((int(part) for part in reversed(prefix.split(".")) if part.isdigit()), 0)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim ** -0.5,
                              get_rope(head_dim, max_position, theta, scaling), is_last_layer,
                              sliding_window_of(config, layer_index))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        norms = (self.q_norm, self.k_norm) if self.use_qk_norm else ()
        return self.o_proj(self.attn(positions, self.qkv_proj(hidden_states), *norms))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None, prefix: str,
                 intermediate_size: int | None = None) -> None:
        """intermediate_size: config.intermediate_size unless given (DeepSeek's shared experts)."""
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config: Any, max_position: int, quant_config: QuantizationConfig | None, prefix: str,
                 is_last_layer: bool = False) -> None:
        super().__init__()
        self.is_last_layer = is_last_layer
        self.self_attn = self.attention_cls(config, max_position, quant_config, f"{prefix}.self_attn", is_last_layer)
        self.mlp = self.make_mlp(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config: Any, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        """The layer's MLP (MoE models choose per layer: `prefix` ends in the layer's index and ".mlp")."""
        return LlamaMLP(config, quant_config, prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """In the last layer of a pass that reads only the logits rows (the forward context's logits_rows),
        the rows past attention are only those."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        if self.is_last_layer:
            logits_rows = get_forward_context().logits_rows
            if logits_rows is not None:
                residual = residual[logits_rows]
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config: Any, max_position: int, quant_config: QuantizationConfig | None = None,
                 prefix: str = "model") -> None:
        super().__init__()
        num_layers = config.num_hidden_layers
        self.hidden_size, self.dtype = config.hidden_size, torch.get_default_dtype()
        self.start_layer, self.end_layer = pp_layer_range(num_layers)
        # A pipeline stage holds its layers; the first the embedding, the last the final norm.
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, f"{prefix}.embed_tokens")
                             if is_first_stage() else None)
        self.layers = nn.ModuleList(
            self.layer_cls(config, max_position, quant_config, f"{prefix}.layers.{i}",
                           is_last_layer=i == num_layers - 1)
            if self.start_layer <= i < self.end_layer else PPMissingLayer() for i in range(num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if is_last_stage() else None
        # EAGLE-3 reads the hidden states entering these layers (residual stream, before the layer's norm); a
        # forward pass then leaves them in aux_hidden_states, in this order. Empty (the default): none kept.
        self.aux_hidden_state_layers: tuple[int, ...] = ()
        self.aux_hidden_states: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Hidden states of every row, or only of the forward context's logits_rows when it sets them: the
        last layer then computes keys and values for every row, and the rest only for those rows. A stage
        before the last takes its input from the stage before it (hidden states and residual) and passes its
        output on, returning None."""
        if is_first_stage():
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            shape = (input_ids.shape[0], self.hidden_size)
            hidden_states, residual = pp_recv([shape, shape], self.dtype, input_ids.device)
        kept: dict[int, torch.Tensor] = {}
        for i in range(self.start_layer, self.end_layer):
            if self.aux_hidden_state_layers and i in self.aux_hidden_state_layers:
                # (a copy: on the GPU the first layer's norm adds into its input, the residual, in place)
                kept[i] = hidden_states.clone() if residual is None else hidden_states + residual
            hidden_states, residual = self.layers[i](positions, hidden_states, residual)
        if kept:
            self.aux_hidden_states = [kept[i] for i in self.aux_hidden_state_layers]
        if not is_last_stage():
            pp_send([hidden_states, residual])
            return None
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
    # MoE models: an expert's projection in the checkpoint -> FusedMoE's shard ("w1" gate, "w3" up, "w2" down)
    expert_shards: dict[str, str] = {}
    # KV-cache scales of FP8 checkpoints (llm-compressor's names, old and new) -> the attention layer's
    renamed = {
        ".self_attn.k_scale": ".self_attn.attn.k_scale",
        ".self_attn.v_scale": ".self_attn.attn.v_scale",
        ".self_attn.k_proj.output_scale": ".self_attn.attn.k_scale",
        ".self_attn.v_proj.output_scale": ".self_attn.attn.v_scale",
    }

    def __init__(self, config: Any, max_position: int, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config, self.quant_config = config, quant_config
        self.model = self.model_cls(config, max_position, quant_config, "model")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size, "lm_head", quant_config)
                        if is_last_stage() else None)
        # Tied: one parameter where one stage holds both; a last stage without the embedding loads it as its head.
        self.shares_embedding = self.tie_word_embeddings and self.lm_head is not None \
            and self.model.embed_tokens is not None
        if self.shares_embedding:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
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
            name = next((name.replace(old, new) for old, new in self.renamed.items() if name.endswith(old)), name)
            if not self._on_this_stage(name):
                if not (name == "model.embed_tokens.weight" and self.tie_word_embeddings and self.lm_head is not None):
                    continue
                name = "lm_head.weight"
            loaded.add(self._load_tensor(params, name, tensor))
        if self.shares_embedding:
            loaded.add("lm_head.weight")
        return loaded

    def _load_tensor(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> str:
        """Copies checkpoint tensor `name` into its parameter (or its shard of a packed or expert parameter);
        returns the parameter's name."""
        expert = expert_weight_target(name, self.expert_shards)
        if expert is not None:
            target, shard_id, expert_id = expert
            self._param(params, target, name).weight_loader(params[target], tensor, shard_id, expert_id)
            return target
        for piece, (packed, shard_id) in self.packed_modules.items():
            if piece in name:
                target = name.replace(piece, packed)
                self._param(params, target, name).weight_loader(params[target], tensor, shard_id)
                return target
        param = self._param(params, name, name)
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            if param.shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: {tuple(param.shape)} vs {tuple(tensor.shape)}")
            param.data.copy_(tensor)
        else:
            loader(param, tensor)
        return name

    def _on_this_stage(self, name: str) -> bool:
        """Whether this pipeline stage holds the parameter of checkpoint tensor `name`."""
        layer = _LAYER_INDEX.match(name)
        if layer is not None:
            return self.model.start_layer <= int(layer.group(1)) < self.model.end_layer
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None
        if name.startswith(("model.norm.", "lm_head.")):
            return self.lm_head is not None
        return True

    @staticmethod
    def _param(params: dict[str, nn.Parameter], target: str, name: str) -> nn.Parameter:
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the model")
        return params[target]
