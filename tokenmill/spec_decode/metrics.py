"""Acceptance counters of speculative decoding, named as vLLM's (vllm:spec_decode_num_drafts,
..._num_draft_tokens, ..._num_accepted_tokens, ..._num_accepted_tokens_per_pos). Torch-free: fed the host
lists of a step's draft counts and the rejection sampler's accepted counts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodingStats:
    num_spec_tokens: int  # k
    num_drafts: int = 0  # requests that verified at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [k]: drafts accepted at position j

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def observe(self, num_draft_tokens: list[int], num_accepted: list[int]) -> None:
        """One step: per request, the drafts it verified and how many of them were accepted."""
        for drafted, accepted in zip(num_draft_tokens, num_accepted):
            if drafted == 0:
                continue
            self.num_drafts += 1
            self.num_draft_tokens += drafted
            self.num_accepted_tokens += accepted
            for position in range(accepted):
                self.num_accepted_tokens_per_pos[position] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per drafting request and step: the accepted drafts plus the final token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
