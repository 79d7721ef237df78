"""StructuredOutputManager's batch operations against xgrammar's one-matcher-at-a-time reference."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill.structured import manager as manager_module
from tokenmill.structured.manager import StructuredOutputManager, StructuredRequest

xgr = pytest.importorskip("xgrammar")

VOCAB = ["a", "b", "c", "ab", "ba", "cc", "</s>"]
GRAMMAR = 'root ::= ("a" | "b")+ "c" ("a" | "b" | "c")*'


def grammar():
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[len(VOCAB) - 1])
    return xgr.GrammarCompiler(info).compile_grammar(xgr.Grammar.from_ebnf(GRAMMAR))


def grammars(matchers) -> list[StructuredRequest]:
    out = []
    for matcher in matchers:
        out.append(StructuredRequest(None))
        out[-1].matcher = matcher
    return out


def allowed(matcher) -> list[int]:
    bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
    matcher.fill_next_token_bitmask(bitmask)
    return [t for t in range(len(VOCAB)) if bitmask[0, t // 32] >> (t % 32) & 1]


@pytest.mark.parametrize("num_threads", [1, 4])
def test_accept_in_parallel_chunks_equals_one_by_one(num_threads, monkeypatch):
    monkeypatch.setattr(manager_module, "MIN_MATCHERS_PER_THREAD", 3)
    manager = StructuredOutputManager(lambda: None, len(VOCAB))
    manager._num_threads = num_threads
    compiled = grammar()
    rng = random.Random(0)
    batch = [xgr.GrammarMatcher(compiled) for _ in range(40)]
    reference = [xgr.GrammarMatcher(compiled) for _ in range(40)]
    for _ in range(12):
        live = [i for i, m in enumerate(reference) if not m.is_terminated()]
        matchers, tokens = [], []
        for i in live:
            # a legal token each; every fifth matcher takes two in a row (kept in order, in one chunk)
            for _ in range(2 if i % 5 == 0 else 1):
                if reference[i].is_terminated():
                    break
                token = rng.choice(allowed(reference[i]))
                assert reference[i].accept_token(token)
                matchers.append(batch[i])
                tokens.append(token)
        manager.accept(grammars(matchers), tokens)
        for ours, theirs in zip(batch, reference):
            assert ours.is_terminated() == theirs.is_terminated()
            if not theirs.is_terminated():
                assert allowed(ours) == allowed(theirs)


def test_start_fill_fills_the_given_rows_in_the_background_and_allows_everything_elsewhere():
    manager = StructuredOutputManager(lambda: None, len(VOCAB))
    compiled = grammar()
    first, second = grammars([xgr.GrammarMatcher(compiled) for _ in range(2)])
    manager.accept([second, second], [0, 1])  # "a" "b": "c" is allowed now
    bitmask = manager.start_fill([first, second], [3, 1], 5).result()
    assert bitmask.shape == (5, 1) and bitmask.dtype == torch.int32
    def unpack(row: int) -> list[int]:
        return [t for t in range(len(VOCAB)) if bitmask[row, 0] >> t & 1]

    assert unpack(3) == allowed(first.matcher)
    assert unpack(1) == allowed(second.matcher)
    assert 2 not in unpack(3) and 2 in unpack(1)
    for row in (0, 2, 4):  # unconstrained rows
        assert unpack(row) == list(range(len(VOCAB)))
    manager.accept([second, second], [2, len(VOCAB) - 1])  # "c", then the stop token
    assert (first.terminated, second.terminated) == (False, True)
