"""LLMEngine: the synchronous engine behind LLM: frontend processing around an in-process EngineCore."""

from __future__ import annotations

import logging
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.core.interface import EngineCoreRequest
from tokenmill.engine.core import EngineCore
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.processor import Processor, PromptType
from tokenmill.loader import ModelSource, load_tokenizer, resolve_model
from tokenmill.metrics import step_timer
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def eos_token_ids(source: ModelSource, tokenizer: Any | None) -> set[int]:
    """The model's end-of-sequence ids: from its config (may be a list) and its tokenizer."""
    ids: set[int] = set()
    eos = getattr(source.hf_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig, skip_tokenizer_init: bool = False) -> None:
        self.config = config
        self.source = resolve_model(config.model.model, config.model.revision)
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(self.source, config.model.tokenizer)
        self.core = EngineCore(config, self.source)
        self.processor = Processor(self.tokenizer, config.scheduler.max_model_len,
                                   self.source.hf_config.vocab_size, eos_token_ids(self.source, self.tokenizer))
        self.output_processor = OutputProcessor(self.tokenizer)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        text, request = self.processor.process(request_id, prompt, params)
        for core_id, core_params in self.output_processor.add_request(request_id, text, request.prompt_token_ids,
                                                                      params):
            self.core.add_request(EngineCoreRequest(core_id, request.prompt_token_ids, core_params))

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.core.abort_requests(self.output_processor.abort(request_id))

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        with step_timer.phase("frontend"):
            outputs, to_abort = self.output_processor.process_outputs(core_outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.parents)
