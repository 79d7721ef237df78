"""A step's SamplingMetadata, built from the persistent batch's per-row sampling parameters.

The per-row filters (temperature, top-p, top-k, min-p) go through pinned staged buffers, so their copies
never block the host; a filter no row uses is None, so the sampler skips it. Seeds, logprobs, logit bias
and min-tokens masks are gathered per request; penalties, which need each request's prompt and output
tokens on the device, only when some request asks for them.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.layers.sampler import SamplingMetadata
from tokenmill.worker.buffers import StagedBuffer
from tokenmill.worker.input_batch import InputBatch


class SamplingInputs:
    def __init__(self, max_num_reqs: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.buffers = {name: StagedBuffer(max_num_reqs, dtype, device) for name, dtype in (
            ("temperature", torch.float32), ("top_p", torch.float32), ("top_k", torch.int64),
            ("min_p", torch.float32))}

    def _staged(self, name: str, values: np.ndarray) -> torch.Tensor:
        buffer = self.buffers[name]
        buffer.np[:len(values)] = values
        return buffer.to_device(len(values))

    def build(self, batch: InputBatch, rows: np.ndarray) -> SamplingMetadata:
        """The metadata of the requests in `rows`, in that order (greedy rows have temperature 0)."""
        temperature = batch.temperature[rows]
        top_p, min_p, top_k = batch.top_p[rows], batch.min_p[rows], batch.top_k[rows]
        states = [batch.states[r] for r in rows]
        meta = SamplingMetadata(
            temperature=self._staged("temperature", temperature),
            top_p=self._staged("top_p", top_p) if (top_p < 1.0).any() else None,
            top_k=self._staged("top_k", np.where(top_k > 0, top_k, self.vocab_size)) if (top_k > 0).any() else None,
            min_p=self._staged("min_p", min_p) if (min_p > 0).any() else None,
            all_greedy=bool((temperature == 0).all()), all_random=bool((temperature > 0).all()))
        wants_penalties = False
        for i, state in enumerate(states):
            params = state.sampling_params
            if state.generator is not None:
                meta.generators[i] = state.generator
            if params.logprobs is not None:
                meta.max_num_logprobs = max(meta.max_num_logprobs or 0, params.logprobs)
            if params.logit_bias:
                meta.logit_bias.append((i, list(params.logit_bias), list(params.logit_bias.values())))
            if len(state.output_token_ids) < params.min_tokens and params.all_stop_token_ids:
                meta.min_tokens_masks.append((i, sorted(params.all_stop_token_ids)))
            wants_penalties |= (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                                or params.presence_penalty != 0.0)
        if wants_penalties:
            self._add_penalties(meta, batch, rows)
        return meta

    def _add_penalties(self, meta: SamplingMetadata, batch: InputBatch, rows: np.ndarray) -> None:
        """Prompt and output tokens as [rows, longest] matrices padded with vocab_size, and the penalties."""
        pad = self.vocab_size
        num_prompt, num_tokens = batch.num_prompt_tokens[rows], batch.num_tokens[rows]
        prompt = np.full((len(rows), max(1, int(num_prompt.max()))), pad, dtype=np.int64)
        output = np.full((len(rows), max(1, int((num_tokens - num_prompt).max()))), pad, dtype=np.int64)
        for i, row in enumerate(rows):
            prompt[i, :num_prompt[i]] = batch.token_ids[row, :num_prompt[i]]
            output[i, :num_tokens[i] - num_prompt[i]] = batch.token_ids[row, num_prompt[i]:num_tokens[i]]

        def to_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device)

        meta.prompt_token_ids, meta.output_token_ids = to_device(prompt), to_device(output)
        meta.repetition_penalties = to_device(batch.repetition_penalty[rows])
        meta.frequency_penalties = to_device(batch.frequency_penalty[rows])
        meta.presence_penalties = to_device(batch.presence_penalty[rows])
