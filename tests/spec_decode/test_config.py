"""SpeculativeConfig: vLLM's keys, defaults and inference; bad values refused with the key named."""

from __future__ import annotations

import pytest

from tokenmill.spec_decode.config import SpeculativeConfig


def test_ngram_defaults_follow_vllm():
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (4, 4)
    only_min = SpeculativeConfig.from_dict({"method": "[ngram]", "num_speculative_tokens": 3, "prompt_lookup_min": 2})
    assert (only_min.method, only_min.prompt_lookup_min, only_min.prompt_lookup_max) == ("ngram", 2, 2)


def test_json_string_and_method_inferred_from_model():
    config = SpeculativeConfig.from_dict(
        '{"model": "[ngram]", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 3}')
    assert (config.method, config.model, config.num_speculative_tokens) == ("ngram", None, 4)
    assert SpeculativeConfig(model="yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", num_speculative_tokens=2).method == "eagle3"
    assert SpeculativeConfig(model="yuhuili/EAGLE-LLaMA3-Instruct-8B", num_speculative_tokens=2).method == "eagle"
    assert SpeculativeConfig(model="Qwen/Qwen3-0.6B", num_speculative_tokens=2).method == "draft_model"
    assert SpeculativeConfig(method="deepseek_mtp", num_speculative_tokens=1).method == "mtp"


def test_draft_model_keys_are_kept():
    config = SpeculativeConfig.from_dict({"method": "draft_model", "model": "m", "num_speculative_tokens": 5,
                                          "draft_tensor_parallel_size": 1, "max_model_len": 2048,
                                          "quantization": "fp8"})
    assert (config.draft_tensor_parallel_size, config.max_model_len, config.quantization) == (1, 2048, "fp8")
    config.check_target(tensor_parallel_size=2, max_model_len=4096)
    with pytest.raises(ValueError, match="max_model_len"):
        config.check_target(tensor_parallel_size=2, max_model_len=1024)
    for method, model in (("eagle", "e"), ("mtp", None)):  # heads run on the target's ranks
        with pytest.raises(ValueError, match=f"draft_tensor_parallel_size must be .* for method '{method}'"):
            SpeculativeConfig(method=method, model=model, num_speculative_tokens=1,
                              draft_tensor_parallel_size=1).check_target(tensor_parallel_size=2, max_model_len=4096)


@pytest.mark.parametrize("config, key", [
    ({"method": "medusa2", "num_speculative_tokens": 2}, "method"),
    ({"num_speculative_tokens": 2, "prompt_lookup_max": 3}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 3},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "some/model"}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "model"),
    ({"method": "eagle3", "num_speculative_tokens": 2, "model": "h", "prompt_lookup_max": 3}, "prompt_lookup_max"),
    ({"method": "draft_model", "model": "m", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 0},
     "draft_tensor_parallel_size"),
    ({"method": "draft_model", "model": "m", "num_speculative_tokens": 2, "max_model_len": -1}, "max_model_len"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup": 3}, "prompt_lookup"),
    ({"method": "eagle", "model": "e", "num_speculative_tokens": 2, "tensor_parallel_size": 2},
     "draft_tensor_parallel_size"),
])
def test_bad_config_is_refused_naming_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        SpeculativeConfig.from_dict(config)


def test_not_an_object_is_refused():
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(ValueError, match="speculative_config"):
            SpeculativeConfig.from_dict(bad)
