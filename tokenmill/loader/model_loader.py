"""load_model: build the architecture's modules on the device, fill them through the load format's
WeightLoader, then let each linear method (and each MoE layer's experts' method) prepare its weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.quantization import get_quantization_config
from tokenmill.loader.registry import loader_class
from tokenmill.models.registry import resolve_model_class
from tokenmill.source import ModelSource

logger = logging.getLogger(__name__)


def load_model(source: ModelSource, config: ModelConfig, dtype: torch.dtype, device: torch.device,
               model_cls: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The model of `source` on `device` in `dtype`, its weights filled as `config.load_format` says
    (config resolved: max_model_len is the rotary tables' length). model_cls(hf_config, max_model_len,
    quant_config) builds it; by default the class of the config's architecture."""
    started = time.perf_counter()
    load_format = source.format if config.load_format == "auto" else config.load_format
    loader = loader_class(load_format)(source, load_format)
    model_cls = model_cls or resolve_model_class(source.hf_config)
    quant_config = get_quantization_config(source.hf_config, config.quantization)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(source.hf_config, config.max_model_len, quant_config)
    finally:
        torch.set_default_dtype(previous)
    loader.load(model, dtype, config.seed)
    for module in model.modules():
        method = getattr(module, "linear_method", None) or getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    kept = f", {quant_config.name} quantization" if quant_config is not None else ""
    logger.info("model loaded in %.1f s (%s, %s, %s weights%s)", time.perf_counter() - started, dtype, device,
                load_format, kept)
    return model.eval()
