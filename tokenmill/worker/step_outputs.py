"""What a step hands back: the prompt logprobs it computed, and its sampled tokens recorded in the batch
and packed into a ModelRunnerOutput."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tokenmill.core.interface import ModelRunnerOutput, TokenLogprobs
from tokenmill.layers.sampler import gather_logprobs
from tokenmill.worker.input_batch import CachedRequestState, InputBatch


def compute_prompt_logprobs(model: nn.Module, batch: InputBatch, rows: np.ndarray, num_scheduled: np.ndarray,
                            hidden_states: torch.Tensor, device: torch.device) -> dict[str, list[TokenLogprobs]]:
    """Logprobs of the prompt tokens whose predecessors are computed this step, for the requests that ask
    (hidden_states: every row of the step)."""
    result: dict[str, list[TokenLogprobs]] = {}
    start = 0
    for row, count in zip(rows.tolist(), num_scheduled.tolist()):
        state = batch.states[row]
        token_start, start = start, start + count
        k = state.sampling_params.prompt_logprobs
        # positions p in [first, last) predict prompt token p + 1; after a preemption the
        # recomputed positions that were already reported are skipped
        first = max(int(batch.num_computed_tokens[row]), state.num_prompt_logprobs_done)
        last = min(int(batch.num_computed_tokens[row]) + count, int(batch.num_prompt_tokens[row]) - 1)
        if k is None or last <= first:
            continue
        skip = first - int(batch.num_computed_tokens[row])
        logits = model.compute_logits(hidden_states[token_start + skip:token_start + skip + last - first])
        targets = torch.from_numpy(batch.token_ids[row, first + 1:last + 1].astype(np.int64)).to(device)
        ids, values, ranks = gather_logprobs(torch.log_softmax(logits.float(), dim=-1), targets, k)
        result[state.req_id] = list(zip(ids.tolist(), values.tolist(), ranks.tolist()))
        state.num_prompt_logprobs_done = last
    return result


def collect_sampled(batch: InputBatch, states: dict[str, CachedRequestState], req_ids: list[str],
                    samples: np.ndarray, sampled: list[list[int]], logprob_lists: list[list] | None,
                    prompt_logprobs: dict[str, list[TokenLogprobs]], record: bool = True,
                    logprob_starts: list[int] | None = None) -> ModelRunnerOutput:
    """Appends each request's sampled tokens (one, or with drafts the accepted ones and the next) to its state
    (through its batch row if it still has one), unless `record` is off (pipeline stages get the tokens from
    the scheduler), and packs the step's output; a prompt chunk's sample, or that of a request finished
    meanwhile, is dropped. logprob_lists: (ids [rows][1 + k], logprobs [rows][1 + k], ranks [rows]) when asked
    for, a row per sampled token: request i's from row logprob_starts[i] (default: row i, one token each)."""
    sampled_ids, logprobs = [], []
    for i, req_id in enumerate(req_ids):
        state = states.get(req_id)
        if not samples[i] or state is None:
            sampled_ids.append([])
            logprobs.append(None)
            continue
        tokens = sampled[i]
        if record:
            row = batch.index.get(req_id)
            for token_id in tokens:
                if row is not None:
                    batch.append_token(row, token_id)
                else:  # preempted since the launch
                    state.output_token_ids.append(token_id)
        sampled_ids.append(tokens)
        k = state.sampling_params.logprobs
        if k is not None and logprob_lists is not None:
            ids, values, ranks = logprob_lists
            start = i if logprob_starts is None else logprob_starts[i]
            logprobs.append([(ids[r][:1 + k], values[r][:1 + k], ranks[r]) for r in range(start, start + len(tokens))])
        else:
            logprobs.append(None)
    return ModelRunnerOutput(req_ids, sampled_ids, logprobs, prompt_logprobs)
