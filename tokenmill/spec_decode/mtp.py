"""MTP speculation (`{"method": "mtp"}`): DeepSeek-V3's multi-token-prediction module (models/deepseek_mtp.py)
proposes k tokens per request. It is an EAGLE-1 head in all but its weights: it reads token t at position t - 1
beside the target's output there, then its own output at later depths, so the EAGLE proposer (eagle.py) runs it
with its own one-layer latent KV pool over the target's block ids. This file only finds and loads the module:
from the target's own checkpoint (layer num_hidden_layers), or from speculative_config.model where given.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from tokenmill.config import EngineConfig
from tokenmill.loader.model_loader import load_model
from tokenmill.loader.registry import loader_class
from tokenmill.models.deepseek_mtp import DeepseekMTPHead, mtp_parameter_name
from tokenmill.models.deepseek_v2 import DeepseekV2ForCausalLM
from tokenmill.source import ModelSource, resolve_model

# Real DeepSeek-V3 checkpoints hold both: dummy weights make them too rather than draw over the target's.
_DUMMY_NAMES = {"embed_tokens.weight", "lm_head.weight"}


def load_mtp_head(config: EngineConfig, target_source: ModelSource, target: nn.Module, device: torch.device,
                  dtype: torch.dtype) -> DeepseekMTPHead:
    """The first MTP module of speculative_config.model (None: the target's checkpoint); refuses a model without
    one, naming the key."""
    spec = config.speculative_config
    source = target_source if spec.model is None else resolve_model(spec.model)
    hf_config = source.hf_config
    num_mtp_layers = getattr(hf_config, "num_nextn_predict_layers", None)
    if not num_mtp_layers:
        raise ValueError(f"speculative_config.method 'mtp' needs multi-token-prediction layers; {source.name!r} "
                         f"has none (its config's num_nextn_predict_layers is {num_mtp_layers})")
    if not isinstance(target, DeepseekV2ForCausalLM):
        raise ValueError(f"speculative_config.method 'mtp' runs DeepSeek-V3's MTP layers beside a DeepSeek target, "
                         f"not {type(target).__name__}")
    for key in ("vocab_size", "hidden_size"):
        if getattr(hf_config, key) != getattr(target.config, key):
            raise ValueError(f"speculative_config.model {spec.model!r} has {key} {getattr(hf_config, key)}; the "
                             f"target's is {getattr(target.config, key)}")
    load_format = source.format if config.model.load_format == "auto" or spec.model else config.model.load_format
    if load_format == "dummy":
        names = _DUMMY_NAMES
    else:
        layer_index = hf_config.num_hidden_layers
        names = {mtp_parameter_name(name, layer_index)
                 for name, _ in loader_class(load_format)(source, load_format).weights(dtype)} - {None}
        if not names:
            raise ValueError(f"speculative_config.method 'mtp': {source.name!r} sets num_nextn_predict_layers "
                             f"{num_mtp_layers} but its checkpoint has no MTP tensors (model.layers.{layer_index}.*)")
    model_config = dataclasses.replace(config.model, max_model_len=config.scheduler.max_model_len,
                                       load_format=load_format, quantization=None)
    model_cls = functools.partial(DeepseekMTPHead, target=target, checkpoint_names=names)
    return load_model(source, model_config, dtype, device, model_cls)
