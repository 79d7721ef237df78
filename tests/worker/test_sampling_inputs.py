"""A step's SamplingMetadata from the batch rows: filters present only when a row uses them, per-request
seeds, logprobs, logit bias, min-tokens masks, and penalty inputs padded with the vocabulary size."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.input_batch import CachedRequestState, InputBatch
from tokenmill.worker.sampling_inputs import SamplingInputs

VOCAB = 50


def make_batch(*params: SamplingParams, outputs: list[list[int]] | None = None) -> InputBatch:
    batch = InputBatch(max_num_reqs=4, max_model_len=16, max_blocks_per_req=4)
    for i, p in enumerate(params):
        p.update_from_generation_config({2})
        generator = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        batch.add(CachedRequestState(f"r{i}", [3, 4, 5][:i + 1], list((outputs or [[]] * 4)[i]), p, generator))
    return batch


def test_plain_rows_need_no_filters():
    batch = make_batch(SamplingParams(temperature=0), SamplingParams(temperature=0.7))
    meta = SamplingInputs(4, VOCAB, torch.device("cpu")).build(batch, np.array([1, 0]))
    assert meta.temperature.tolist() == [np.float32(0.7), 0.0]
    assert meta.top_p is None and meta.top_k is None and meta.min_p is None
    assert not meta.all_greedy and not meta.all_random and meta.output_token_ids is None
    assert meta.generators == {} and meta.max_num_logprobs is None


def test_filters_seeds_logprobs_bias_and_min_tokens():
    batch = make_batch(SamplingParams(top_k=5, logprobs=3), SamplingParams(top_p=0.5, seed=11, min_tokens=2),
                       SamplingParams(min_p=0.1, logit_bias={7: 1.5}, logprobs=1))
    meta = SamplingInputs(4, VOCAB, torch.device("cpu")).build(batch, np.array([0, 1, 2]))
    assert meta.top_k.tolist() == [5, VOCAB, VOCAB]  # rows without top-k: the whole vocabulary
    assert meta.top_p.tolist() == [1.0, 0.5, 1.0] and meta.min_p.tolist() == [0.0, 0.0, np.float32(0.1)]
    assert list(meta.generators) == [1] and meta.max_num_logprobs == 3 and meta.all_random
    assert meta.logit_bias == [(2, [7], [1.5])] and meta.min_tokens_masks == [(1, [2])]


def test_penalty_inputs():
    batch = make_batch(SamplingParams(), SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5),
                       outputs=[[9], [8, 8, 6]])
    meta = SamplingInputs(4, VOCAB, torch.device("cpu")).build(batch, np.array([0, 1]))
    assert meta.prompt_token_ids.tolist() == [[3, VOCAB], [3, 4]]
    assert meta.output_token_ids.tolist() == [[9, VOCAB, VOCAB], [8, 8, 6]]
    assert meta.repetition_penalties.tolist() == [1.0, np.float32(1.2)]
    assert meta.frequency_penalties.tolist() == [0.0, 0.5] and meta.presence_penalties.tolist() == [0.0, 0.0]
