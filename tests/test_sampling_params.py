"""SamplingParams on the CPU: clone independence."""

from __future__ import annotations

import copy
import dataclasses
import enum

from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

IMMUTABLE = (int, float, str, bytes, type(None), enum.Enum)


def full_params() -> SamplingParams:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = SamplingParams(n=2, seed=3, stop=["x", "yz"], stop_token_ids=[4, 5], logit_bias={6: 1.5},
                            structured_outputs=StructuredOutputsParams(json=schema, after_token_ids=[7]))
    params.update_from_generation_config({8})
    return params


def test_clone_equals_and_shares_nothing_mutable():
    params = full_params()
    clone = params.clone()
    assert clone == params and clone is not params
    for field in dataclasses.fields(SamplingParams):
        value = getattr(params, field.name)
        if not isinstance(value, IMMUTABLE):
            assert getattr(clone, field.name) is not value, field.name


def test_mutating_a_clone_leaves_the_original_unchanged():
    params = full_params()
    before = copy.deepcopy(params)
    clone = params.clone()
    clone.n, clone.seed = 1, 9
    clone.stop.append("w")
    clone.stop_token_ids.append(10)
    clone.logit_bias[11] = -1.0
    clone.all_stop_token_ids.add(12)
    clone.structured_outputs.json["properties"]["b"] = {"type": "string"}
    clone.structured_outputs.after_token_ids.append(13)
    assert params == before
    assert params.structured_outputs.json == before.structured_outputs.json
