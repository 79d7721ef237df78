"""LLMEngine: the synchronous engine behind LLM: frontend processing around an in-process EngineCore.

The engine core (and with it torch and the model code) is imported when an LLMEngine is built, not when
this module is: the frontend modules load without it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tokenmill.config import EngineConfig
from tokenmill.core.interface import EngineCoreRequest
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.processor import Processor, PromptType
from tokenmill.metrics import step_timer
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.source import eos_token_ids, load_tokenizer, log_sampling_defaults, resolve_model, sampling_defaults


class LLMEngine:
    def __init__(self, config: EngineConfig, skip_tokenizer_init: bool = False) -> None:
        if config.parallel.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 runs engine cores behind the server (tokenmill serve -dp N); "
                             "LLM runs one engine")
        self.source = resolve_model(config.model.model, config.model.revision)
        # The tokenizer loads in a thread while the engine core loads the weights (mostly numpy and torch
        # copies, which release the GIL).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer") as pool:
            tokenizer = None if skip_tokenizer_init else pool.submit(load_tokenizer, self.source,
                                                                     config.model.tokenizer)
            from tokenmill.engine.core import EngineCore

            self.core = EngineCore(config, self.source)
            self.tokenizer = None if tokenizer is None else tokenizer.result()
        self.config = self.core.config  # resolved
        self.sampling_defaults = sampling_defaults(self.source, config.model.generation_config,
                                                   config.model.override_generation_config)
        log_sampling_defaults(self.sampling_defaults)
        self.processor = Processor(self.tokenizer, self.config.scheduler.max_model_len,
                                   self.source.hf_config.vocab_size, eos_token_ids(self.source, self.tokenizer))
        self.output_processor = OutputProcessor(self.tokenizer)

    def shutdown(self) -> None:
        """Stops the engine's other ranks (if any) and leaves their torch.distributed world."""
        self.core.shutdown()

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
