"""The n-gram proposer against a brute-force reference of vLLM's rule (longest suffix n-gram in
[prompt_lookup_min, prompt_lookup_max], its earliest earlier occurrence, the up-to-k tokens after it)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tokenmill.spec_decode.ngram import NgramProposer


def reference(tokens: list[int], min_n: int, max_n: int, k: int, max_model_len: int) -> list[int]:
    total = len(tokens)
    k = min(k, max_model_len - total)
    if k <= 0:
        return []
    for n in range(max_n, min_n - 1, -1):
        if n >= total:
            continue
        suffix = tokens[total - n:]
        for start in range(total - n):  # the occurrence ends before the last token
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def propose(proposer: NgramProposer, sequences: list[list[int]]) -> list[list[int]]:
    width = max(len(s) for s in sequences) + 3  # extra columns hold junk, as in the persistent batch
    token_ids = np.full((len(sequences), width), 7, dtype=np.int32)
    for row, seq in enumerate(sequences):
        token_ids[row, :len(seq)] = seq
    drafts, counts = proposer.propose(token_ids, np.array([len(s) for s in sequences]))
    assert drafts.dtype == np.int32 and (drafts[np.arange(proposer.k)[None, :] >= counts[:, None]] == -1).all()
    return [drafts[row, :counts[row]].tolist() for row in range(len(sequences))]


def test_crafted_sequences():
    proposer = NgramProposer(prompt_lookup_min=2, prompt_lookup_max=3, num_speculative_tokens=4, max_model_len=100)
    sequences = [
        [1, 2, 3, 4, 2, 3],  # vLLM's docstring example: [2, 3] matched, [4, 2, 3] follows
        [5, 1, 2, 9, 1, 2, 8, 1, 2],  # two earlier occurrences of [1, 2]: the earliest wins
        [4, 1, 2, 3, 6, 6, 9, 2, 3, 7, 1, 2, 3],  # the 3-gram [1, 2, 3] beats the later 2-gram [2, 3]
        [1, 1, 1, 1],  # the occurrence overlaps the suffix
        [1, 2, 3, 4, 5],  # no repeat
        [3],  # too short
        [6, 6],  # [6] is only a 1-gram
    ]
    assert propose(proposer, sequences) == [[4, 2, 3], [9, 1, 2, 8], [6, 6, 9, 2], [1], [], [], []]


def test_k_is_cut_at_max_model_len():
    proposer = NgramProposer(prompt_lookup_min=1, prompt_lookup_max=2, num_speculative_tokens=5, max_model_len=10)
    assert propose(proposer, [[1, 2, 3, 4, 5, 6, 7, 1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]]) == [[2, 3], []]


@pytest.mark.parametrize("min_n, max_n, k", [(1, 1, 3), (1, 4, 5), (2, 5, 2), (3, 3, 4)])
def test_random_sequences_match_the_reference(min_n, max_n, k):
    rng = np.random.default_rng(min_n * 10 + max_n)
    proposer = NgramProposer(min_n, max_n, k, max_model_len=60)
    for _ in range(20):
        # Small alphabets make repeats (and long ones) common; lengths include 0 and 1.
        sequences = [rng.integers(0, rng.integers(2, 6), size=rng.integers(0, 64)).tolist() for _ in range(16)]
        if all(len(s) == 0 for s in sequences):
            continue
        assert propose(proposer, sequences) == [reference(s, min_n, max_n, k, 60) for s in sequences]


def test_thousands_of_tokens_are_fast():
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, 32000, size=(256, 4096), dtype=np.int32)
    token_ids[:, -6:] = token_ids[:, 100:106]  # every row's tail repeats an earlier stretch
    proposer = NgramProposer(1, 5, 4, max_model_len=8192)
    started = time.perf_counter()
    drafts, counts = proposer.propose(token_ids, np.full(256, 4096))
    assert time.perf_counter() - started < 2.0  # about 0.01 s on two cores
    assert (counts == 4).all() and (drafts == token_ids[:, 106:110]).all()
