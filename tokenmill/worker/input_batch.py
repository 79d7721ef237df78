"""The persistent batch: one row per request the runner holds, kept in host arrays between steps.

Rows change only when requests join (appended) or leave (the last row moves into the hole), so a
step's inputs are a few vectorized numpy gathers over these arrays instead of per-token Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.core.interface import SchedulerOutput
from tokenmill.core.request import token_array
from tokenmill.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_prompt_logprobs_done: int = 0  # prompt positions whose logprobs were reported


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int) -> None:
        self.max_num_reqs = max_num_reqs
        self.req_ids: list[str] = []
        self.states: list[CachedRequestState] = []
        self.index: dict[str, int] = {}
        # +1: the token sampled at max_model_len is stored before the scheduler caps the request
        self.token_ids = np.zeros((max_num_reqs, max_model_len + 1), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int32)
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, dtype=np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self._row_arrays = [self.token_ids, self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens,
                            self.block_table, self.num_blocks, self.temperature, self.top_p, self.top_k,
                            self.min_p, self.repetition_penalty, self.frequency_penalty, self.presence_penalty]

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    def add(self, state: CachedRequestState) -> int:
        row = self.num_reqs
        if row >= self.max_num_reqs:
            raise RuntimeError(f"persistent batch is full ({self.max_num_reqs} rows)")
        self.req_ids.append(state.req_id)
        self.states.append(state)
        self.index[state.req_id] = row
        tokens = state.prompt_token_ids + state.output_token_ids
        self.token_ids[row, :len(tokens)] = token_array(tokens, np.int32)
        self.num_tokens[row] = len(tokens)
        self.num_prompt_tokens[row] = len(state.prompt_token_ids)
        self.num_computed_tokens[row] = state.num_computed_tokens
        self.num_blocks[row] = 0
        self.append_blocks(row, state.block_ids)
        params = state.sampling_params
        self.temperature[row] = 0.0 if params.greedy else params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k
        self.min_p[row] = params.min_p
        self.repetition_penalty[row] = params.repetition_penalty
        self.frequency_penalty[row] = params.frequency_penalty
        self.presence_penalty[row] = params.presence_penalty
        return row

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = self.num_blocks[row]
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def remove(self, req_id: str) -> None:
        row = self.index.pop(req_id)
        last = self.num_reqs - 1
        if row != last:
            moved = self.req_ids[last]
            for array in self._row_arrays:
                array[row] = array[last]
            self.req_ids[row], self.states[row] = moved, self.states[last]
            self.index[moved] = row
        self.req_ids.pop()
        self.states.pop()

    def append_token(self, row: int, token_id: int) -> None:
        self.token_ids[row, self.num_tokens[row]] = token_id
        self.num_tokens[row] += 1
        self.states[row].output_token_ids.append(token_id)


def update_states(batch: InputBatch, states: dict[str, CachedRequestState], scheduler_output: SchedulerOutput,
                  device: torch.device) -> None:
    """Applies a step's differences from the scheduler: finished requests are forgotten, preempted ones
    leave the batch (their state is kept for their return), new and resumed ones join it, and running
    ones get their new blocks and computed-token counts."""
    for req_id in scheduler_output.finished_req_ids:
        states.pop(req_id, None)
        if req_id in batch.index:
            batch.remove(req_id)
    for req_id in scheduler_output.preempted_req_ids:
        if req_id in batch.index:
            batch.remove(req_id)
    for new in scheduler_output.scheduled_new_reqs:
        state = states.get(new.req_id)
        if state is None:
            params = new.sampling_params
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=device).manual_seed(params.seed)
            state = CachedRequestState(new.req_id, new.prompt_token_ids, [], params, generator)
            states[new.req_id] = state
        # The scheduler's outputs of a resumed request are complete; a pipeline's stages may lack the last.
        state.output_token_ids = list(new.output_token_ids)
        state.block_ids = list(new.block_ids)
        state.num_computed_tokens = new.num_computed_tokens
        batch.add(state)
    for cached in scheduler_output.scheduled_cached_reqs:
        row = batch.index[cached.req_id]
        for token_id in cached.new_token_ids:
            batch.append_token(row, token_id)
        batch.num_computed_tokens[row] = cached.num_computed_tokens
        if cached.new_block_ids:
            batch.states[row].block_ids.extend(cached.new_block_ids)
            batch.append_blocks(row, cached.new_block_ids)
