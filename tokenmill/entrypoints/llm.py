"""LLM: offline batch inference, shaped like vLLM's class of the same name."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.processor import PromptType
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

ChatMessage = dict[str, Any]


class LLM:
    """An engine for a model, run in this process.

        llm = LLM()  # the embedded SmolLM2-135M-Instruct
        outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=32))
    """

    def __init__(self, model: str = "default", *, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9, kv_cache_memory_bytes: int | None = None,
                 seed: int = 0, load_format: str = "auto", enforce_eager: bool = False,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 skip_tokenizer_init: bool = False, tensor_parallel_size: int = 1, device: str = "auto",
                 **kwargs: Any) -> None:
        config = EngineConfig.from_kwargs(
            model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes, seed=seed,
            load_format=load_format, enforce_eager=enforce_eager, enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill, tensor_parallel_size=tensor_parallel_size, device=device,
            **kwargs)
        self.llm_engine = LLMEngine(config, skip_tokenizer_init=skip_tokenizer_init)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's recommended defaults (its generation config, see
        `generation_config`), what generate() and chat() use when given none."""
        return SamplingParams(**self.llm_engine.sampling_defaults)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts")
        return self._run(list(prompts), list(sampling_params), use_tqdm)

    def chat(self, messages: list[ChatMessage] | list[list[ChatMessage]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._render_chat(conv, chat_template, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _render_chat(self, conversation: list[ChatMessage], chat_template: str | None,
                     add_generation_prompt: bool) -> dict[str, Any]:
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (the engine was started with skip_tokenizer_init)")
        text = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        request_ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                sp = sp.clone()
                sp.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, sp)
                request_ids.append(request_id)
        except Exception:
            engine.abort_request(request_ids)
            raise
        results: dict[str, RequestOutput] = {}
        # No bar at all without use_tqdm: even a disabled one took 0.15 ms before the first step.
        bar = tqdm(total=len(request_ids), desc="Processed prompts") if use_tqdm else None
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in request_ids]

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block (device and host tier); False while requests hold blocks."""
        return self.llm_engine.core.reset_prefix_cache()

    def get_metrics(self) -> dict[str, float]:
        """Engine counters and gauges under vLLM's metric names."""
        stats = self.llm_engine.core.stats()
        return {"vllm:num_requests_running": stats.num_running_reqs,
                "vllm:num_requests_waiting": stats.num_waiting_reqs,
                "vllm:kv_cache_usage_perc": stats.kv_cache_usage,
                "vllm:num_preemptions": stats.num_preemptions,
                "vllm:prefix_cache_queries": stats.prefix_cache_queries,
                "vllm:prefix_cache_hits": stats.prefix_cache_hits,
                "vllm:external_prefix_cache_hits": stats.prefix_cache_host_hits,
                "vllm:spec_decode_num_drafts": stats.spec_decode_num_drafts,
                "vllm:spec_decode_num_draft_tokens": stats.spec_decode_num_draft_tokens,
                "vllm:spec_decode_num_accepted_tokens": stats.spec_decode_num_accepted_tokens,
                **{f'vllm:spec_decode_num_accepted_tokens_per_pos{{position="{j}"}}': n
                   for j, n in enumerate(stats.spec_decode_num_accepted_tokens_per_pos)}}
