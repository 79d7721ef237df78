"""Acceptance counters over steps with ragged draft counts."""

from __future__ import annotations

from tokenmill.spec_decode.metrics import SpecDecodingStats


def test_counters_follow_the_steps():
    stats = SpecDecodingStats(num_spec_tokens=3)
    stats.observe(num_draft_tokens=[3, 0, 2], num_accepted=[2, 0, 0])
    stats.observe(num_draft_tokens=[3], num_accepted=[3])
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 8, 5)
    assert stats.num_accepted_tokens_per_pos == [2, 2, 1]
    assert stats.acceptance_rate == 5 / 8 and stats.mean_acceptance_length == 1 + 5 / 3
    assert SpecDecodingStats(num_spec_tokens=2).acceptance_rate == 0.0
