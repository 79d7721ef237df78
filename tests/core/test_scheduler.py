"""CPU tests of the block pool, KV cache manager and scheduler with exact block ids and queue order."""

from __future__ import annotations

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.core.block_pool import BlockPool, hash_full_blocks
from tokenmill.core.interface import ModelRunnerOutput
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams

BS = 4


def make_request(request_id: str, num_prompt: int, max_tokens: int = 8, first_token: int = 100, **params) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, **params)
    return Request(request_id, list(range(first_token, first_token + num_prompt)), sampling, max_tokens, 0.0)


def make_scheduler(num_blocks: int, max_num_batched_tokens: int = 64, max_num_seqs: int = 8,
                   caching: bool = False, max_model_len: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, async_scheduling=False)
    return Scheduler(config, KVCacheManager(num_blocks, BS, caching))


def run_step(scheduler: Scheduler, token: int = 7):
    """One scheduler step with a fake runner that samples `token` for every request that completes."""
    out = scheduler.schedule()
    req_ids, sampled = [], []
    for request_id in out.num_scheduled_tokens:
        request = scheduler.requests[request_id]
        req_ids.append(request_id)
        sampled.append([token] if request.num_computed_tokens >= request.num_tokens else [])
    results = scheduler.update_from_output(out, ModelRunnerOutput(req_ids, sampled, [None] * len(req_ids)))
    scheduler.check_integrity()
    return out, results


def test_block_pool_free_queue_order_and_eviction():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    assert (a.block_id, b.block_id) == (0, 1)
    [h] = hash_full_blocks(None, [1, 2, 3, 4], BS)
    pool.cache_full_blocks([a, b], [h], 0, 1)
    pool.free_blocks([b, a])  # tail first
    # b had no hash: it goes to the front; a (hashed) to the back, so it is evicted last
    assert list(pool.free_queue) == [1, 2, 3, 0]
    assert pool.get_cached_block(h) is a
    pool.touch([a])
    assert a.ref_cnt == 1 and 0 not in pool.free_queue
    pool.free_blocks([a])
    taken = pool.get_new_blocks(4)
    assert [blk.block_id for blk in taken] == [1, 2, 3, 0]
    assert pool.get_cached_block(h) is None  # evicted when reused
    pool.check_integrity()


def test_hash_chain_depends_on_parent_and_tokens():
    [h1] = hash_full_blocks(None, [1, 2, 3, 4], BS)
    assert hash_full_blocks(None, [1, 2, 3, 4], BS) == [h1]
    assert hash_full_blocks(h1, [5, 6, 7, 8], BS) != hash_full_blocks(None, [5, 6, 7, 8], BS)
    assert hash_full_blocks(None, [1, 2, 3, 5], BS) != [h1]
    assert hash_full_blocks(None, [1, 2, 3, 4], BS, extra_keys=("lora", 1)) != [h1]


def test_hash_chain_covers_full_blocks_only_and_extends_block_by_block():
    tokens = list(range(100, 111))  # two full blocks of 4 and 3 tokens left over
    h1, h2 = hash_full_blocks(None, tokens, BS)
    assert hash_full_blocks(None, tokens[:8], BS) == [h1, h2]
    assert hash_full_blocks(h1, tokens[4:8], BS) == [h2]
    assert h1 != h2 and hash_full_blocks(None, tokens[4:8], BS) != [h2]
    assert hash_full_blocks(None, tokens[:3], BS) == []
    # one token id apart, or a large id, changes the block and every block after it
    assert hash_full_blocks(None, [100, 101, 102, 104] + tokens[4:8], BS)[1] != h2
    assert hash_full_blocks(None, [2**40] + tokens[1:4], BS) != hash_full_blocks(None, [0] + tokens[1:4], BS)


def test_fcfs_admission_and_exact_block_ids():
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add_request(make_request("a", 6))
    scheduler.add_request(make_request("b", 3))
    out, results = run_step(scheduler)
    assert out.num_scheduled_tokens == {"a": 6, "b": 3}
    assert [r.req_id for r in out.scheduled_new_reqs] == ["a", "b"]
    assert [r.block_ids for r in out.scheduled_new_reqs] == [[0, 1], [2]]
    assert [r.new_token_ids for r in results] == [[7], [7]]
    out, _ = run_step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}  # positions 6 and 3: no new block
    assert {c.req_id: c.new_block_ids for c in out.scheduled_cached_reqs} == {"a": [], "b": []}
    out, _ = run_step(scheduler)  # b's position 4 opens its second block; a's position 7 fits in block 1
    assert {c.req_id: c.new_block_ids for c in out.scheduled_cached_reqs} == {"a": [], "b": [3]}


def test_chunked_prefill_mixes_with_decode():
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=5)
    scheduler.add_request(make_request("a", 2))
    scheduler.add_request(make_request("b", 12))
    out, results = run_step(scheduler)
    assert out.num_scheduled_tokens == {"a": 2, "b": 3}
    assert [r.request_id for r in results] == ["a"]  # b's chunk produces no token
    out, _ = run_step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "b": 4}
    out, results = run_step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "b": 4}
    assert scheduler.requests["b"].num_computed_tokens == 11
    out, results = run_step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert {r.request_id for r in results} == {"a", "b"}


def test_preemption_of_newest_and_recompute():
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    scheduler.add_request(make_request("old", 4, max_tokens=8))
    scheduler.add_request(make_request("new", 4, max_tokens=8))
    run_step(scheduler)  # old: blocks [0], new: [1]; both at 5 tokens next step
    out, _ = run_step(scheduler)  # each needs a second block: old [0, 2], new [1, 3]
    assert scheduler.kv.pool.num_free_blocks == 0
    out, _ = run_step(scheduler)  # 6 tokens each, still fits
    out, _ = run_step(scheduler)  # 7 tokens each
    out, _ = run_step(scheduler)  # old computes 8 tokens: fits; then 9th token needs a 3rd block
    out, _ = run_step(scheduler)
    assert out.preempted_req_ids == {"new"}
    assert out.num_scheduled_tokens == {"old": 1}
    new = scheduler.requests["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert list(scheduler.waiting) == [new]
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        run_step(scheduler)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.num_preemptions >= 1
    assert scheduler.kv.pool.num_free_blocks == 4


def test_stop_conditions():
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add_request(make_request("eos", 2, max_tokens=8))
    scheduler.requests["eos"].sampling_params.all_stop_token_ids = {7}
    scheduler.add_request(make_request("min", 2, max_tokens=8, min_tokens=3))
    scheduler.requests["min"].sampling_params.all_stop_token_ids = {7}
    scheduler.add_request(make_request("len", 2, max_tokens=2))
    _, results = run_step(scheduler)
    finished = {r.request_id: r.finish_reason for r in results if r.finished}
    assert finished == {"eos": "stop"}
    _, results = run_step(scheduler)
    assert {r.request_id: r.finish_reason for r in results if r.finished} == {"len": "length"}
    _, results = run_step(scheduler)
    assert {r.request_id: r.finish_reason for r in results if r.finished} == {"min": "stop"}
    assert scheduler.kv.pool.num_free_blocks == 16


def test_max_num_seqs_and_abort():
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=2)
    for name in "abc":
        scheduler.add_request(make_request(name, 3))
    out, _ = run_step(scheduler)
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    scheduler.finish_requests(["a", "c"], RequestStatus.FINISHED_ABORTED)
    out, _ = run_step(scheduler)
    assert out.finished_req_ids == {"a", "c"}
    assert set(out.num_scheduled_tokens) == {"b"}
    scheduler.check_integrity()


def test_prefix_hits_with_exact_accounting():
    scheduler = make_scheduler(num_blocks=32, caching=True)
    prompt = 10  # 2 full blocks + 2 tokens
    scheduler.add_request(make_request("first", prompt, max_tokens=1))
    run_step(scheduler)
    assert not scheduler.requests  # finished, blocks cached but free
    scheduler.add_request(make_request("second", prompt, max_tokens=1))
    out, results = run_step(scheduler)
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 8 and out.num_scheduled_tokens == {"second": 2}
    assert new.block_ids[:2] == [0, 1]
    assert results[0].num_cached_tokens == 8
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8)


def test_rejects_overlong_prompt():
    scheduler = make_scheduler(num_blocks=16, max_model_len=8)
    with pytest.raises(ValueError, match="max_model_len=8"):
        scheduler.add_request(make_request("long", 9))


def make_spec_scheduler(k: int, async_scheduling: bool = True, **policy) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                             async_scheduling=async_scheduling, num_speculative_tokens=k, **policy)
    return Scheduler(config, KVCacheManager(32, BS, False))


def spec_output(out, sampled: list[int], proposed: list[int], num_verified: int) -> ModelRunnerOutput:
    """One request's runner output: its emitted tokens, the drafts proposed after them, drafts it verified."""
    [request_id] = out.num_scheduled_tokens
    return ModelRunnerOutput([request_id], [sampled], [None], spec_token_ids=[proposed],
                             num_draft_tokens=[num_verified])


def test_async_speculation_schedules_placeholders_and_rolls_back_the_rejected():
    """Step n+1 is scheduled before step n's tokens are in: its drafts are placeholders and every draft in
    flight counts as accepted; each update steps back over its step's rejected (or missing) drafts, so
    num_computed_tokens ends one short of the tokens, the last one sampled, as without async scheduling."""
    scheduler = make_spec_scheduler(k=3)
    scheduler.add_request(make_request("r", 6, max_tokens=20))
    request = scheduler.requests["r"]
    prefill = scheduler.schedule()
    assert prefill.num_scheduled_tokens == {"r": 6} and request.num_output_placeholders == 1
    first = scheduler.schedule()  # the prefill's token is in flight: the drafts after it too
    assert first.scheduled_spec_decode_tokens == {"r": [-1, -1, -1]} and first.num_scheduled_tokens == {"r": 4}
    assert (request.num_computed_tokens, request.num_output_placeholders) == (10, 5)
    scheduler.update_from_output(prefill, spec_output(prefill, [7], [1, 2, 3], 0))
    assert (request.num_tokens, request.num_computed_tokens, request.num_output_placeholders) == (7, 10, 4)
    second = scheduler.schedule()
    assert second.num_scheduled_tokens == {"r": 4} and request.num_computed_tokens == 14
    scheduler.update_from_output(first, spec_output(first, [1, 9], [4], 3))  # one of three drafts accepted
    assert (request.num_tokens, request.num_computed_tokens, request.num_output_placeholders) == (9, 12, 4)
    scheduler.update_from_output(second, spec_output(second, [4, 5], [], 1))  # a single draft, accepted
    assert (request.num_tokens, request.num_computed_tokens, request.num_output_placeholders) == (11, 10, 0)
    assert request.output_token_ids == [7, 1, 9, 4, 5]
    stats = scheduler.stats()
    assert (stats.spec_decode_num_draft_tokens, stats.spec_decode_num_accepted_tokens) == (4, 2)
    third = scheduler.schedule()  # nothing in flight: the drafts proposed after the last step, real ones
    assert third.scheduled_spec_decode_tokens == {} and third.num_scheduled_tokens == {"r": 1}
    scheduler.check_integrity()


def test_async_speculation_counts_drafts_in_flight_against_max_tokens():
    """Placeholders never outrun max_tokens, counting the tokens in flight as if all their drafts were
    accepted; a request whose last token may be in flight waits for it."""
    scheduler = make_spec_scheduler(k=3)
    scheduler.add_request(make_request("r", 6, max_tokens=4))
    request = scheduler.requests["r"]
    prefill = scheduler.schedule()
    first = scheduler.schedule()
    assert first.scheduled_spec_decode_tokens == {"r": [-1, -1]}  # 1 in flight + 1 + 2 drafts = max_tokens
    assert scheduler.schedule().num_scheduled_tokens == {}
    scheduler.update_from_output(prefill, spec_output(prefill, [7], [1, 2], 0))
    scheduler.update_from_output(first, spec_output(first, [1, 8], [3], 2))
    assert request.num_output_placeholders == 0 and request.num_computed_tokens == request.num_tokens - 1
    last = scheduler.schedule()
    assert last.num_scheduled_tokens == {"r": 1} and last.scheduled_spec_decode_tokens == {}
    [result] = scheduler.update_from_output(last, spec_output(last, [3], [], 0))
    assert result.finish_reason == "length" and request.output_token_ids == [7, 1, 8, 3]


def test_draft_policy_stops_drafting_above_the_batch_size():
    scheduler = make_spec_scheduler(k=2, async_scheduling=False, spec_disable_by_batch_size=2)
    for name in "abc":
        scheduler.add_request(make_request(name, 3, first_token=10 * len(scheduler.requests)))
    prefill = scheduler.schedule()
    scheduler.update_from_output(prefill, ModelRunnerOutput(list("abc"), [[7]] * 3, [None] * 3,
                                                            spec_token_ids=[[1, 2]] * 3))
    decode = scheduler.schedule()
    assert decode.num_scheduled_tokens == dict.fromkeys("abc", 1)  # three running, more than two: no drafts
    scheduler.finish_requests(["c"], RequestStatus.FINISHED_ABORTED)
    scheduler.update_from_output(decode, ModelRunnerOutput(list("abc"), [[8]] * 3, [None] * 3,
                                                           spec_token_ids=[[1, 2]] * 3, num_draft_tokens=[0] * 3))
    assert scheduler.schedule().scheduled_spec_decode_tokens == {"a": [1, 2], "b": [1, 2]}
