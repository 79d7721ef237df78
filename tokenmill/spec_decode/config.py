"""SpeculativeConfig: vLLM's `speculative_config` ({"method": ..., "num_speculative_tokens": k, ...}, or the
same as a JSON string from --speculative-config), validated on construction with errors that name the key.

Torch-free, like tokenmill/config.py. What vLLM accepts in these keys is accepted here, with its defaults:
  - method "ngram" (alias "[ngram]"), also inferred from model "ngram" / "[ngram]" without a method; its
    prompt_lookup_min / prompt_lookup_max default to 5 / 5, and to each other when only one is given.
    Prompt-lookup keys alone (no method, no model) are refused, as vLLM refuses them.
  - method "eagle" / "eagle3" / "draft_model" need `model`; with a model and no method, a name holding
    "eagle3" or "eagle-" picks EAGLE as vLLM does, anything else is "draft_model".
  - method "mtp" (vLLM's older names such as "deepseek_mtp" mean the same): `model` None means the target's
    own checkpoint.
The dynamic draft length (spec_decode/draft_policy.py): vLLM's disable_by_batch_size (an integer >= 2, as vLLM
requires) and tokenmill's disable_by_acceptance_rate (in (0, 1]); both None (off) by default.
Checks that need the target model (the draft's tensor-parallel size is 1 or the target's, max_model_len within
the target's) are in `check_target`, called once the target's config is known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model", "eagle", "eagle3", "mtp")
# Older or alternative names vLLM accepts for a method.
METHOD_ALIASES = {"[ngram]": "ngram", **{name: "mtp" for name in (
    "deepseek_mtp", "mimo_mtp", "glm4_moe_mtp", "ernie_mtp", "qwen3_next_mtp", "longcat_flash_mtp")}}
NEEDS_MODEL = ("draft_model", "eagle", "eagle3")
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's, for both ends when neither is given


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"speculative_config.{name} {message}")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class SpeculativeConfig:
    method: str | None = None  # None: inferred from `model` (see the module docstring)
    num_speculative_tokens: int | None = None  # k, draft tokens proposed per request and step; required
    prompt_lookup_min: int | None = None  # ngram: shortest suffix n-gram looked up
    prompt_lookup_max: int | None = None  # ngram: longest suffix n-gram looked up
    model: str | None = None  # draft model or EAGLE head (path or hub id)
    draft_tensor_parallel_size: int | None = None  # None: the target's
    max_model_len: int | None = None  # the draft's; None: the smaller of the draft's and the target's
    quantization: str | None = None  # the draft's weight format (draft_model)
    disable_by_batch_size: int | None = None  # no drafts in a step of more running requests than this
    disable_by_acceptance_rate: float | None = None  # a request's drafts pause below this acceptance (average)

    def __post_init__(self) -> None:
        self.method = self._resolve_method()
        _require(_is_positive_int(self.num_speculative_tokens), "num_speculative_tokens",
                 f"must be an integer >= 1, got {self.num_speculative_tokens!r}")
        if self.method == "ngram":
            self._resolve_prompt_lookup()
        else:
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                _require(getattr(self, name) is None, name, f"applies to method 'ngram' only, not {self.method!r}")
        _require(self.method not in NEEDS_MODEL or isinstance(self.model, str) and self.model != "", "model",
                 f"must name the draft model or head for method {self.method!r}")
        for name in ("draft_tensor_parallel_size", "max_model_len"):
            value = getattr(self, name)
            _require(value is None or _is_positive_int(value), name, f"must be an integer >= 1, got {value!r}")
        _require(self.quantization is None or isinstance(self.quantization, str), "quantization",
                 f"must be a format name, got {self.quantization!r}")
        size = self.disable_by_batch_size
        _require(size is None or _is_positive_int(size) and size >= 2, "disable_by_batch_size",
                 f"must be an integer >= 2, got {size!r}")
        rate = self.disable_by_acceptance_rate
        _require(rate is None or isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate <= 1,
                 "disable_by_acceptance_rate", f"must be a number in (0, 1], got {rate!r}")

    def _resolve_method(self) -> str:
        method, model = self.method, self.model
        _require(model is None or isinstance(model, str), "model", f"must be a path or hub id, got {model!r}")
        _require(method is None or isinstance(method, str), "method", f"must be one of {METHODS}, got {method!r}")
        if method is None:
            _require(model is not None, "method", f"must be one of {METHODS} (or `model` given), got None")
            if model in ("ngram", "[ngram]"):
                method = "ngram"
            elif "eagle3" in model.lower():
                method = "eagle3"
            elif "eagle-" in model.lower():
                method = "eagle"
            else:
                method = "draft_model"
        method = METHOD_ALIASES.get(method, method)
        _require(method in METHODS, "method", f"must be one of {METHODS}, got {self.method!r}")
        if method == "ngram":
            _require(model in (None, "ngram", "[ngram]"), "model", f"takes no model for method 'ngram', got {model!r}")
            self.model = None
        return method

    def _resolve_prompt_lookup(self) -> None:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        for name, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            _require(value is None or _is_positive_int(value), name, f"must be an integer >= 1, got {value!r}")
        if low is None and high is None:
            low = high = DEFAULT_PROMPT_LOOKUP
        elif low is None:
            low = high
        elif high is None:
            high = low
        _require(low <= high, "prompt_lookup_min", f"must be <= prompt_lookup_max={high}, got {low}")
        self.prompt_lookup_min, self.prompt_lookup_max = low, high

    @classmethod
    def from_dict(cls, config: dict[str, Any] | str) -> SpeculativeConfig:
        """From LLM(speculative_config={...}) or the CLI's JSON string; unknown keys are refused."""
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {config!r}")
        known = {f.name for f in fields(cls)}
        for key in config:
            if key == "tensor_parallel_size":  # vLLM's hint for a common slip
                raise ValueError("speculative_config.tensor_parallel_size is not a key; "
                                 "use draft_tensor_parallel_size")
            _require(key in known, key, f"is not a known key; known keys: {sorted(known)}")
        return cls(**config)

    def check_target(self, tensor_parallel_size: int, max_model_len: int) -> None:
        """Refuses a draft that cannot run beside this target (vLLM's rules)."""
        _require(self.draft_tensor_parallel_size in (None, 1, tensor_parallel_size), "draft_tensor_parallel_size",
                 f"must be 1 or the target's tensor_parallel_size ({tensor_parallel_size}), "
                 f"got {self.draft_tensor_parallel_size}")
        # An EAGLE or MTP head runs on the target's ranks, its layers split as the target's (it reads the
        # target's hidden states and may share its embedding and LM head).
        eagle = self.method in ("eagle", "eagle3", "mtp")
        _require(not eagle or self.draft_tensor_parallel_size in (None, tensor_parallel_size),
                 "draft_tensor_parallel_size", f"must be the target's tensor_parallel_size ({tensor_parallel_size}) "
                 f"for method {self.method!r}, got {self.draft_tensor_parallel_size}")
        _require(self.max_model_len is None or self.max_model_len <= max_model_len, "max_model_len",
                 f"must be at most the target's max_model_len ({max_model_len}), got {self.max_model_len}")
