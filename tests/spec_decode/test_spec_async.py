"""Async scheduling with speculation (placeholder drafts, rolled back on the next update) gives the greedy
tokens of synchronous speculation and of no speculation, under preemption with stop strings and stop tokens
inside accepted runs; and the dynamic draft length leaves greedy tokens alone while it stops a request whose
drafts are always rejected from drafting (counted by the acceptance metrics). EAGLE and draft-model runs with
async scheduling on and off are in test_eagle.py and test_spec_engine.py."""

from __future__ import annotations

import pytest
import transformers
from test_spec_engine import REPETITIVE, generate, ngram

from tokenmill import SamplingParams
from tokenmill.spec_decode.draft_policy import PROBE_INTERVAL


@pytest.fixture(scope="module")
def target(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def plain(target):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs, _ = generate(target, None, REPETITIVE, params, async_scheduling=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_ngram_async_equals_sync_under_preemption_with_stops_in_accepted_runs(target, plain):
    """A pool of 6 blocks preempts; the first request stops at a string and the second at a token, late enough
    to be inside runs the n-gram drafts predicted (the tiny model repeats itself)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    stop_string = tokenizer.decode(plain[0][20:22])
    params = [SamplingParams(temperature=0, max_tokens=30, stop=[stop_string]),
              SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[plain[1][21]]),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)]
    runs = {}
    for async_scheduling in (True, False):
        outputs, metrics = generate(target, ngram(3), REPETITIVE, params, max_model_len=80,
                                    kv_cache_memory_bytes=48 << 10, async_scheduling=async_scheduling)
        runs[async_scheduling] = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                                  for o in outputs]
        assert metrics["vllm:num_preemptions"] > 0 and metrics["vllm:spec_decode_num_accepted_tokens"] > 0
    assert runs[True] == runs[False]
    tokens = [run[0] for run in runs[True]]
    assert tokens[2] == plain[2] and tokens[3] == plain[3][:25]
    assert tokens[1] == plain[1][:plain[1].index(plain[1][21]) + 1] and runs[True][1][2] == "stop"
    assert runs[True][0][2] == "stop" and tokens[0] == plain[0][:len(tokens[0])] and len(tokens[0]) <= 22


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_dynamic_draft_length_keeps_greedy_tokens(async_scheduling, target, plain):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs, metrics = generate(target, ngram(3, disable_by_acceptance_rate=0.5), REPETITIVE, params,
                                async_scheduling=async_scheduling)
    assert [o.outputs[0].token_ids for o in outputs] == plain
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0


def test_a_request_whose_drafts_are_always_rejected_stops_drafting(target, tiny_model_dir, monkeypatch):
    """A draft model of another architecture (random, with the target's vocabulary) whose drafts the target
    rejects: without the policy it drafts at every step; with it, two steps take the acceptance average below
    0.5 (1 -> 0.5 -> 0.25), one more runs ahead under async scheduling, then one probe every PROBE_INTERVAL steps.
    Under async scheduling the draft model runs only for the steps that verify its drafts."""
    from tokenmill.spec_decode.draft_model import DraftModelProposer

    proposals = []
    propose = DraftModelProposer.propose
    monkeypatch.setattr(DraftModelProposer, "propose",
                        lambda self, batch, rows, meta: proposals.append(len(rows)) or propose(self, batch, rows, meta))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    counts, proposed = {}, {}
    for rate in (None, 0.5):
        spec = {"model": tiny_model_dir("qwen3"), "num_speculative_tokens": 3, "disable_by_acceptance_rate": rate}
        proposals.clear()
        outputs, metrics = generate(target, spec, REPETITIVE[:1], params)
        assert metrics["vllm:spec_decode_num_accepted_tokens"] == 0
        counts[rate], proposed[rate] = metrics["vllm:spec_decode_num_drafts"], sum(proposals)
    num_decode_steps = 39
    assert counts[None] >= num_decode_steps - 4  # the last steps have no room for drafts
    assert 0 < counts[0.5] <= 3 + num_decode_steps // PROBE_INTERVAL
    assert proposed == counts  # (without the skip, 37 proposals for 7 verified with the policy)


@pytest.mark.parametrize("spec, message", [
    (ngram(2, disable_by_batch_size=1), "speculative_config.disable_by_batch_size must be an integer >= 2"),
    (ngram(2, disable_by_acceptance_rate=1.5), r"speculative_config.disable_by_acceptance_rate must be .* \(0, 1\]"),
])
def test_bad_dynamic_draft_keys_are_refused_naming_them(spec, message, target):
    with pytest.raises(ValueError, match=message):
        generate(target, spec, REPETITIVE[:1], SamplingParams(max_tokens=1))
