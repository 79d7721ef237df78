"""A step's staged inputs from the persistent batch, with exact positions, slots, padding and orders."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.input_batch import CachedRequestState, InputBatch
from tokenmill.worker.step_inputs import StepInputs, made_up_metadata

BS = 4
CPU = torch.device("cpu")


def make_batch(requests: list[tuple[list[int], list[int], int]]) -> InputBatch:
    """requests: (tokens, block ids, computed tokens) each."""
    batch = InputBatch(max_num_reqs=8, max_model_len=32, max_blocks_per_req=8)
    for i, (tokens, blocks, computed) in enumerate(requests):
        batch.add(CachedRequestState(f"r{i}", tokens, [], SamplingParams(), None, blocks, computed))
    return batch


def test_mixed_step_with_padding():
    # r0: one decode token at position 5 (blocks 7, 3); r1: a 6-token prompt chunk from position 2 (block 9, 1)
    batch = make_batch([(list(range(100, 106)), [7, 3], 5), (list(range(200, 210)), [9, 1], 2)])
    inputs = StepInputs(max_num_reqs=8, max_num_tokens=16, max_blocks_per_req=8, block_size=BS, device=CPU)
    meta = inputs.prepare(batch, np.array([0, 1]), np.array([1, 6]), padded_reqs=3, padded_tokens=9)
    assert inputs.positions.np[:9].tolist() == [5, 2, 3, 4, 5, 6, 7, 0, 0]
    assert inputs.input_ids.np[:9].tolist() == [105, 202, 203, 204, 205, 206, 207, 0, 0]
    # slot = block_table[pos // 4] * 4 + pos % 4; padding writes nothing
    assert inputs.slot_mapping.np[:9].tolist() == [3 * 4 + 1, 9 * 4 + 2, 9 * 4 + 3, 1 * 4 + 0, 1 * 4 + 1, 1 * 4 + 2,
                                                   1 * 4 + 3, -1, -1]
    assert meta.query_start_loc.tolist() == [0, 1, 7, 7] and meta.seq_lens.tolist() == [6, 8, 0]
    assert (meta.num_actual_tokens, meta.num_reqs, meta.max_query_len, meta.max_seq_len) == (7, 3, 6, 8)
    assert meta.num_decodes == 1 and meta.decode_order.tolist() == [0]
    assert meta.block_table[:2, :2].tolist() == [[7, 3], [9, 1]]
    assert inputs.stage_logits_indices(2).tolist() == [0, 6]
    logits = inputs.logits_metadata(meta, torch.tensor([1, 0], dtype=torch.int32))
    assert logits.query_start_loc.tolist() == [0, 1, 2, 3] and logits.max_query_len == 1
    assert logits.seq_lens is meta.seq_lens and logits.num_actual_tokens == 3


def test_decode_step_orders_the_longest_first_and_feeds_in_flight_tokens():
    # each request's last token was sampled on the device and is not in the batch yet (async scheduling)
    batch = make_batch([([1, 2, 3], [0], 3), ([4, 5, 6, 7, 8, 9], [1, 2], 6), ([10], [3], 1)])
    inputs = StepInputs(8, 16, 8, BS, CPU)
    last_sampled = torch.tensor([55, 66, 77])  # rows of the previous step
    meta = inputs.prepare(batch, np.array([0, 1, 2]), np.array([1, 1, 1]), padded_reqs=4, padded_tokens=4,
                          last_sampled=last_sampled, last_sampled_index={"r0": 2, "r1": 0, "r2": 1})
    assert inputs.positions.np[:4].tolist() == [3, 6, 1, 0]
    assert meta.num_actual_tokens == 3 and inputs.input_ids.gpu[:4].tolist() == [77, 55, 66, 0]
    assert meta.seq_lens.tolist() == [4, 7, 2, 0] and meta.num_decodes == 0
    # ascending length, then the padding rows (the kernel starts the last tile first: the longest request)
    assert meta.decode_order.tolist() == [2, 0, 1, 3]


def test_made_up_metadata():
    meta, positions = made_up_metadata([1, 3], [9, 3], torch.zeros(2, 4, dtype=torch.int32),
                                       torch.full((4,), -1), max_model_len=16, device=CPU)
    assert positions.tolist() == [8, 0, 1, 2]
    assert meta.query_start_loc.tolist() == [0, 1, 4] and meta.num_decodes == 1 and meta.max_seq_len == 9
