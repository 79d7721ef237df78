"""Incremental detokenization: token by token, multi-byte UTF-8 and stop strings."""

from __future__ import annotations

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.sampling_params import SamplingParams

TEXTS = ["Hello, world! How are you?", "Grüße aus München — naïve café", "日本語のテキストと中文字符",
         "emoji 🤖🚀 and 👩‍👩‍👧 family", "  leading spaces\tand\nnewlines"]


def test_token_by_token_equals_full_decode(smol_tokenizer):
    prompt = smol_tokenizer.encode("Say:")
    for text in TEXTS:
        ids = smol_tokenizer.encode(" " + text)
        detok = IncrementalDetokenizer(smol_tokenizer, prompt, SamplingParams())
        pieces = []
        for token_id in ids:
            detok.update([token_id])
            pieces.append(detok.get_next_output_text(finished=False, delta=True))
        pieces.append(detok.get_next_output_text(finished=True, delta=True))
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) == smol_tokenizer.decode(ids) == detok.output_text


def test_stop_string_across_tokens_and_hold_back(smol_tokenizer):
    ids = smol_tokenizer.encode(" The answer is forty-two, final.")
    params = SamplingParams(stop=["forty-two"])
    detok = IncrementalDetokenizer(smol_tokenizer, [], params)
    streamed, matched = "", None
    for token_id in ids:
        matched = detok.update([token_id])
        if matched:
            break
        streamed += detok.get_next_output_text(finished=False, delta=True)
        assert "forty" not in streamed  # a possible stop prefix is held back while streaming
    assert matched == "forty-two"
    streamed += detok.get_next_output_text(finished=True, delta=True)
    assert streamed == " The answer is "
