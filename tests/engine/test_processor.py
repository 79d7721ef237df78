"""The frontend's prompt validation, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.engine.processor import Processor
from tokenmill.sampling_params import SamplingParams

VOCAB = 50


def process(prompt_token_ids):
    processor = Processor(None, max_model_len=100, vocab_size=VOCAB, eos_token_ids={1})
    return processor.process("r", {"prompt_token_ids": prompt_token_ids}, SamplingParams())[1]


@pytest.mark.parametrize("ids", [[0, 49], [7] * 100, [np.int64(3), 4], [True, 2]])
def test_integer_ids_in_the_vocabulary_pass(ids):
    assert process(ids).prompt_token_ids == list(ids)


@pytest.mark.parametrize("ids, bad", [([1, 50], 50), ([-1, 2], -1), ([1, 2**70], 2**70), ([1.0, 2], 1.0),
                                      ([3, "a"], "a"), ([None], None), ([[1], 2], [1])])
def test_bad_ids_are_named(ids, bad):
    with pytest.raises(ValueError, match="prompt token ids") as error:
        process(ids)
    assert repr(bad) in str(error.value)
