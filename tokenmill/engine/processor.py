"""Turns a user prompt and SamplingParams into a validated EngineCoreRequest (frontend side)."""

from __future__ import annotations

import struct
from typing import Any

from tokenmill.core.interface import EngineCoreRequest
from tokenmill.core.request import token_array
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import grammar

PromptType = str | dict[str, Any]  # text, or {"prompt_token_ids": [...]} / {"prompt": "..."}


class Processor:
    def __init__(self, tokenizer: Any | None, max_model_len: int, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self._encode(prompt["prompt"])
        raise TypeError(f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got "
                        f"{type(prompt).__name__}")

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (the engine was started with skip_tokenizer_init)")
        return self.tokenizer.encode(text)

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams,
                arrival_time: float | None = None) -> tuple[str | None, EngineCoreRequest]:
        text, prompt_token_ids = self.tokenize(prompt)
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        try:  # one pass in C for a long prompt
            ids = token_array(prompt_token_ids)
        except (struct.error, TypeError):  # an item that is not an integer, or one past int64: named below
            ids = None
        fast_ok = ids is not None and 0 <= ids.min() and ids.max() < self.vocab_size
        bad = [] if fast_ok else [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[:5]}")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt_token_ids)} tokens) is longer than the maximum model "
                             f"length of {self.max_model_len} tokens")
        params.check_vocab(self.vocab_size)
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer (the engine was started with "
                                 "skip_tokenizer_init)")
            grammar.validate(params.structured_outputs)
        params.update_from_generation_config(self.eos_token_ids)
        return text, EngineCoreRequest(request_id, prompt_token_ids, params, arrival_time)
