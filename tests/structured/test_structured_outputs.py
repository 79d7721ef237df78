"""Constrained decoding on the embedded model: every output parses and validates, at temperature 1 too."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams, StructuredOutputsParams

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"],
     "additionalProperties": False},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                               "y": {"type": "number"}},
                                                "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0,
                                                                           "maximum": 1}},
     "required": ["ok", "score"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}},
        "required": ["id", "roles"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 15},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                      "rating": {"enum": [1, 2, 3, 4, 5]}},
     "required": ["title", "year", "rating"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=1024, kv_cache_memory_bytes=96 << 20)


def run(llm, prompt, structured, temperature, n=1, max_tokens=120, seed=0):
    params = SamplingParams(temperature=temperature, n=n, seed=seed, max_tokens=max_tokens,
                            structured_outputs=structured)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schemas_always_validate(llm, temperature, assert_pool_free):
    prompts = [{"prompt": "Reply in JSON: ", "prompt_token_ids": llm.get_tokenizer().encode("Reply in JSON: ")}]
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=160,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for i, schema in enumerate(SCHEMAS)]
    outputs = llm.generate(prompts * len(SCHEMAS), params, use_tqdm=False)
    for schema, output in zip(SCHEMAS, outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)
    assert_pool_free(llm)


def test_regex_choice_grammar_and_json_object(llm):
    for completion in run(llm, "Phone number:", StructuredOutputsParams(regex=r"\(\d{3}\) \d{3}-\d{4}"), 1.0, n=3):
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", completion.text)
    choices = ["positive", "negative", "neutral"]
    for completion in run(llm, "Sentiment of 'great movie':", StructuredOutputsParams(choice=choices), 1.0, n=4):
        assert completion.text in choices
    grammar = 'root ::= "(" expr ")"\nexpr ::= num (("+" | "*") num)*\nnum ::= [1-9] [0-9]?'
    for completion in run(llm, "Arithmetic:", StructuredOutputsParams(grammar=grammar), 1.0, n=2, max_tokens=40):
        if completion.finish_reason == "stop":
            assert re.fullmatch(r"\((?:[1-9][0-9]?)(?:[+*][1-9][0-9]?)*\)", completion.text), completion.text
    (completion,) = run(llm, "A JSON object:", StructuredOutputsParams(json_object=True), 1.0, max_tokens=200)
    if completion.finish_reason == "stop":
        assert isinstance(json.loads(completion.text), dict)


def test_constrained_and_free_requests_share_a_batch_under_preemption(assert_pool_free):
    block_bytes = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2 in float32: layers * (k, v) * tokens * kv heads * dim * 4 B
    llm = LLM(max_model_len=192, kv_cache_memory_bytes=13 * block_bytes)  # 208 tokens: preemption is certain
    schema = SCHEMAS[9]
    tok = llm.get_tokenizer()
    free = SamplingParams(temperature=1.0, seed=1, max_tokens=60, ignore_eos=True)
    constrained = SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=160,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    prompts = [{"prompt_token_ids": tok.encode(f"Movie {i} as JSON:")} for i in range(6)]
    outputs = llm.generate(prompts, [free, constrained] * 3, use_tqdm=False)
    for i, output in enumerate(outputs):
        if i % 2:
            for completion in output.outputs:
                jsonschema.validate(json.loads(completion.text), schema)
        else:
            assert len(output.outputs[0].token_ids) == 60
    assert llm.get_metrics()["vllm:num_preemptions"] > 0
    assert_pool_free(llm)


@pytest.mark.parametrize("bad, kind", [
    (StructuredOutputsParams(json='{"type": "object", "properties": '), "json"),
    (StructuredOutputsParams(regex="a(b"), "regex"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar"),
])
def test_invalid_specs_fail_before_compute(llm, bad, kind):
    with pytest.raises(ValueError, match=f"invalid structured_outputs.{kind}"):
        llm.generate(["x"], SamplingParams(structured_outputs=bad), use_tqdm=False)


def test_params_need_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()


def test_a_grammar_that_fails_to_compile_ends_only_its_request(llm, monkeypatch, assert_pool_free):
    manager = llm.llm_engine.core.structured

    def broken(key):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(manager, "_compile", broken)
    bad = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex="[a-z]+ broken"))
    good = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outputs = llm.generate(["one", "two"], [bad, good], use_tqdm=False)
    assert outputs[0].outputs[0].finish_reason == "abort"
    assert "could not be compiled" in outputs[0].outputs[0].stop_reason
    assert len(outputs[1].outputs[0].token_ids) == 5
    assert_pool_free(llm)


def record_calls(worker) -> list[str]:
    """The order of the worker's launches and finishes, as a list that grows while the engine runs."""
    calls: list[str] = []
    execute_model, finish_step = worker.execute_model, worker.finish_step
    worker.execute_model = lambda *a: calls.append("launch") or execute_model(*a)
    worker.finish_step = lambda: calls.append("finish") or finish_step()
    return calls


def test_async_scheduling_masks_a_step_ahead_with_the_outputs_of_sync_scheduling():
    """With async scheduling a constrained step's forward pass is queued before the previous token is in,
    and its mask filled while that pass runs; greedy outputs equal those of synchronous scheduling, where
    mask and step alternate."""
    prompts = [{"prompt": f"Item {i} as JSON: "} for i in range(4)]
    # With ignore_eos a request ends only when its grammar terminates: at the same token, as stopped.
    params = [SamplingParams(temperature=0, max_tokens=80, ignore_eos=k % 2 == 0,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[i]))
              for k, i in enumerate((0, 4, 7, 9))]
    texts = {}
    for async_scheduling in (True, False):
        llm = LLM(max_model_len=512, kv_cache_memory_bytes=48 << 20, async_scheduling=async_scheduling)
        calls = record_calls(llm.llm_engine.core.worker)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        texts[async_scheduling] = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
                                   for o in outputs]
        assert all(finish == "stop" for _, _, finish in texts[async_scheduling])
        # async: a step is launched while the previous one is unfinished; sync: launch and finish alternate
        ran_ahead = any(a == b == "launch" for a, b in zip(calls, calls[1:]))
        assert ran_ahead == async_scheduling
        for schema, (text, _, _) in zip((SCHEMAS[i] for i in (0, 4, 7, 9)), texts[async_scheduling]):
            jsonschema.validate(json.loads(text), schema)
    assert texts[True] == texts[False]
