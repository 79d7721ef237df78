"""Speculative decoding inside the engine, n-gram and draft model: greedy tokens equal greedy decoding without
speculation (float32, so the batched verification and the one-token steps round alike), under preemption, with
prefix hits, stop strings and max_tokens landing inside an accepted run, beside sampled requests; a draft that is
the target itself has every draft accepted; and the acceptance counters."""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams, StructuredOutputsParams

REPETITIVE = [
    "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,",
    "The capital of France is Paris. The capital of France is",
    "def add(a, b):\n    return a + b\n\ndef add3(a, b, c):\n    return a + b + c\n\ndef add4(",
    "red green blue red green blue red",
]


def ngram(k: int, **keys) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3, **keys}


def generate(model: str | None, spec: dict | None, prompts, params, **kwargs):
    llm = LLM(*([model] if model else []), dtype="float32",
              **{"max_model_len": 512, "kv_cache_memory_bytes": 32 << 20, **kwargs}, speculative_config=spec)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        llm.llm_engine.core.scheduler.check_integrity()
        return outputs, llm.get_metrics()
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_tokens_equal_without_speculation(k, tiny_model_dir):
    path = tiny_model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain, _ = generate(path, None, REPETITIVE, params)
    spec, metrics = generate(path, ngram(k), REPETITIVE, params)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert metrics["vllm:spec_decode_num_drafts"] > 0


def test_embedded_model_mixed_batch_preempted_with_prefix_hits_and_stops():
    """The embedded model in float32: greedy requests (two share a prompt, so the second hits the first's blocks;
    one stops at a string, one at a max_tokens of 7, one at a stop token inside an accepted run) beside seeded
    sampled ones, in a pool so small that requests are preempted. The greedy ones equal the run without
    speculation, token for token."""
    prompts = REPETITIVE + REPETITIVE[:2] + ["Count: one two three one two three one"] + REPETITIVE[:1]
    greedy = SamplingParams(temperature=0, max_tokens=40)
    first, _ = generate(None, None, REPETITIVE[:1], greedy)
    stop_token = first[0].outputs[0].token_ids[8]  # a token of the counting's second round: drafted by then
    params = [greedy, SamplingParams(temperature=0, max_tokens=40, stop=["France is not"]), greedy,
              SamplingParams(temperature=0, max_tokens=7), greedy, greedy,
              SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token])]
    plain, plain_metrics = generate(None, None, prompts, params)
    spec, metrics = generate(None, ngram(4), prompts, params, max_model_len=128, kv_cache_memory_bytes=9 << 20)
    for a, b, p in zip(spec, plain, params):
        if p.temperature == 0:
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, a.prompt
            assert a.outputs[0].text == b.outputs[0].text and a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert len(spec[3].outputs[0].token_ids) == 7 and spec[1].outputs[0].finish_reason == "stop"
    assert len(spec[-2].outputs[0].token_ids) == 30
    assert spec[-1].outputs[0].token_ids[-1] == stop_token and len(spec[-1].outputs[0].token_ids) < 40
    assert metrics["vllm:num_preemptions"] > 0 and metrics["vllm:prefix_cache_hits"] > 0
    drafts, accepted = metrics["vllm:spec_decode_num_draft_tokens"], metrics["vllm:spec_decode_num_accepted_tokens"]
    per_pos = [metrics[f'vllm:spec_decode_num_accepted_tokens_per_pos{{position="{j}"}}'] for j in range(4)]
    assert 0 < accepted <= drafts and sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
    assert plain_metrics["vllm:spec_decode_num_drafts"] == 0


def test_logprobs_of_every_accepted_token():
    """Requests asking for logprobs speculate too: each emitted token (accepted drafts and the one after them)
    reports its own logprobs, as without speculation."""
    params = SamplingParams(temperature=0, max_tokens=30, logprobs=2, ignore_eos=True)
    prompts = REPETITIVE[:1] + REPETITIVE[3:]
    plain, _ = generate(None, None, prompts, params)
    spec, metrics = generate(None, ngram(3), prompts, params)
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 10
    for a, b in zip(spec, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].logprobs) == 30
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert list(step_a) == list(step_b)
            assert all(abs(step_a[t].logprob - step_b[t].logprob) < 1e-4 and step_a[t].rank == step_b[t].rank
                       for t in step_a)
        assert abs(a.outputs[0].cumulative_logprob - b.outputs[0].cumulative_logprob) < 1e-3


def test_grammar_constrained_requests_do_not_draft(tiny_model_dir):
    """A grammar's mask is for one token a step: such requests run unspeculated beside drafting ones."""
    path = tiny_model_dir("llama")
    choice = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(
        choice=["alpha beta gamma", "delta epsilon"]))
    params = [choice, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)]
    prompts = REPETITIVE[:2]
    plain, _ = generate(path, None, prompts, params)
    spec, metrics = generate(path, ngram(3), prompts, params)
    assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in plain]
    assert spec[0].outputs[0].text in ("alpha beta gamma", "delta epsilon")
    assert metrics["vllm:spec_decode_num_drafts"] > 0


@pytest.fixture(scope="module")
def one_layer_draft(tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    """(target, draft): the tiny Llama and its first layer alone (same embeddings and head), as the issue's
    benchmark drafts are made."""
    target = tiny_model_dir("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    draft = tmp_path_factory.mktemp("draft")
    model.save_pretrained(draft)
    return target, str(draft)


@pytest.mark.parametrize("k, async_scheduling", [(2, True), (4, True), (4, False)])
def test_draft_model_greedy_tokens_equal_without_speculation(k, async_scheduling, one_layer_draft):
    """Mixed with a seeded sampled request, in a pool small enough to preempt; with async scheduling
    (placeholder drafts) and without."""
    target, draft = one_layer_draft
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * len(REPETITIVE)
    params = params + [SamplingParams(temperature=0.7, seed=5, max_tokens=20, ignore_eos=True)]
    prompts = REPETITIVE + REPETITIVE[:1]
    plain, _ = generate(target, None, prompts, params)
    spec, metrics = generate(target, {"model": draft, "num_speculative_tokens": k}, prompts, params,
                             max_model_len=64, kv_cache_memory_bytes=84 << 10,  # 7 blocks
                             async_scheduling=async_scheduling)
    assert [o.outputs[0].token_ids for o in spec[:-1]] == [o.outputs[0].token_ids for o in plain[:-1]]
    assert len(spec[-1].outputs[0].token_ids) == 20
    assert metrics["vllm:spec_decode_num_drafts"] > 0 and metrics["vllm:num_preemptions"] > 0


def test_draft_that_is_the_target_has_every_draft_accepted(tiny_model_dir):
    """Greedy and sampled requests: the draft's distribution is the target's, so min(1, p/q) = 1."""
    path = tiny_model_dir("llama")
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=2, max_tokens=20, ignore_eos=True)]
    _, metrics = generate(path, {"method": "draft_model", "model": path, "num_speculative_tokens": 3},
                          REPETITIVE[:2], params)
    assert metrics["vllm:spec_decode_num_draft_tokens"] > 20
    assert metrics["vllm:spec_decode_num_accepted_tokens"] == metrics["vllm:spec_decode_num_draft_tokens"]


def test_draft_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="speculative_config.model .* vocabulary of 1000 tokens; the target's"):
        LLM(tiny_model_dir("llama"), dtype="float32", kv_cache_memory_bytes=8 << 20,
            speculative_config={"model": str(tmp_path), "num_speculative_tokens": 2})


@pytest.mark.parametrize("spec, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "lookahead"),
    ({"method": "mtp", "num_speculative_tokens": 2},
     "speculative_config.method 'mtp' needs multi-token-prediction layers; .* num_nextn_predict_layers is None"),
    ('{"method": "ngram"', "speculative_config is not valid JSON"),
])
def test_bad_speculative_config_is_refused_naming_the_key(spec, message, tiny_model_dir):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model_dir("llama"), dtype="float32", kv_cache_memory_bytes=8 << 20, speculative_config=spec)


def test_prometheus_counters_follow_the_cumulative_totals():
    """The server's /metrics: the core's cumulative totals become counter increments, per position too."""
    from prometheus_client import generate_latest

    from tokenmill.core.interface import SchedulerStats
    from tokenmill.engine.async_llm import IterationStats
    from tokenmill.entrypoints.openai.metrics import PrometheusStatLogger

    logger = PrometheusStatLogger("m")
    for drafts, accepted, per_pos in ((2, 3, (2, 1)), (5, 7, (4, 3))):
        logger.record(SchedulerStats(spec_decode_num_drafts=drafts, spec_decode_num_draft_tokens=2 * drafts,
                                     spec_decode_num_accepted_tokens=accepted,
                                     spec_decode_num_accepted_tokens_per_pos=per_pos), IterationStats())
    text = generate_latest(logger.registry).decode()
    for line in ('vllm:spec_decode_num_drafts_total{model_name="m"} 5.0',
                 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 10.0',
                 'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 7.0',
                 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 4.0',
                 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 3.0'):
        assert line in text
