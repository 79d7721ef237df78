"""The persistent batch: rows join at the end, a leaving row is filled by the last one, and the scheduler's
differences (new, resumed, running, preempted, finished) are applied with exact rows and block tables."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.core.interface import CachedRequestData, NewRequestData, SchedulerOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.input_batch import CachedRequestState, InputBatch, update_states


def new_request(req_id: str, prompt: list[int], blocks: list[int], computed: int = 0, output: list[int] = (),
                **params) -> NewRequestData:
    return NewRequestData(req_id, prompt, list(output), SamplingParams(**params), blocks, computed)


def step(new=(), cached=(), preempted=(), finished=()) -> SchedulerOutput:
    return SchedulerOutput(list(new), list(cached), {}, 0, set(preempted), set(finished))


def test_rows_move_when_a_request_leaves():
    batch = InputBatch(max_num_reqs=4, max_model_len=8, max_blocks_per_req=2)
    for i, req_id in enumerate("abc"):
        state = CachedRequestState(req_id, [10 * i + 1, 10 * i + 2], [], SamplingParams(temperature=0.5 * i), None,
                                   block_ids=[i])
        assert batch.add(state) == i
    batch.remove("a")
    assert batch.req_ids == ["c", "b"] and batch.index == {"c": 0, "b": 1}
    assert batch.token_ids[0, :2].tolist() == [21, 22] and batch.block_table[0, 0] == 2
    assert batch.temperature[:2].tolist() == [1.0, 0.5]
    batch.append_token(1, 99)
    assert batch.num_tokens[1] == 3 and batch.token_ids[1, 2] == 99 and batch.states[1].output_token_ids == [99]


def test_update_states_applies_the_scheduler_differences():
    batch, states = InputBatch(4, 16, 4), {}
    device = torch.device("cpu")
    update_states(batch, states, step(new=[new_request("a", [1, 2, 3], [5]),
                                           new_request("b", [4, 5], [6], seed=7, temperature=1.0)]), device)
    assert batch.req_ids == ["a", "b"] and states["b"].generator is not None and states["a"].generator is None
    # a grows a block and computes its prompt; b is preempted (its state stays for its return)
    update_states(batch, states, step(cached=[CachedRequestData("a", [8], 3)], preempted=["b"]), device)
    assert batch.req_ids == ["a"] and "b" in states
    assert batch.block_table[0, :2].tolist() == [5, 8] and batch.num_blocks[0] == 2
    assert batch.num_computed_tokens[0] == 3 and states["a"].block_ids == [5, 8]
    # b resumes with the token it had sampled; a finishes and is forgotten
    states["b"].output_token_ids.append(42)
    update_states(batch, states, step(new=[new_request("b", [4, 5], [9, 10], computed=0, output=[42])],
                                      finished=["a"]), device)
    assert batch.req_ids == ["b"] and "a" not in states
    assert batch.token_ids[0, :3].tolist() == [4, 5, 42] and batch.num_prompt_tokens[0] == 2
    assert batch.block_table[0, :2].tolist() == [9, 10] and np.all(batch.num_tokens[:1] == 3)
