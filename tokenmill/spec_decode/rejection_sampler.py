"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batched on the logits' device.

Layout. Request i has n_i draft tokens (0 <= n_i <= k) and n_i + 1 target positions: position j < n_i
verifies draft j, position n_i gives the bonus token. Rows are flat and request-major:

    n = [2, 0, 1]
    target rows  [ 0:p0  0:p1  0:bonus | 1:bonus | 2:p0  2:bonus ]     R = sum(n_i + 1) = 6
    draft rows   [ 0:d0  0:d1          |         | 2:d0          ]     D = sum(n_i) = 3
    draft row d of request i is verified by target row d + i

The target distribution at position j is exactly the one the Sampler would use for request i after j more
outputs: the per-request SamplingMetadata is expanded to one row per position (expand_metadata) and run
through the sampler's own steps (layers/sampler.py: logit_bias, min_tokens mask, penalties, temperature,
min_p, top_k, top_p). Penalties at position j count drafts 0..j-1 as outputs, and the min_tokens mask holds
while outputs + j < min_tokens; both are exact, since position j only matters when drafts 0..j-1 are accepted.

Per request:
  greedy (temperature 0): accept drafts while each equals the argmax at its position; the final token is the
    argmax at the first mismatch, or at the bonus position: the tokens greedy decoding gives.
  random: accept draft x with probability min(1, p(x) / q(x)), where q is the draft's distribution (one-hot on
    x when draft_probs is None, as for n-gram drafts: probability p(x)); at the first rejection the final token
    is drawn from max(0, p - q); when all are accepted, from p at the bonus position.
Every request draws n_i uniforms, then its final token; seeded requests draw both from their own generator,
so their tokens do not depend on the batch. A loop over requests touches only the seeded ones, as in the
Sampler. Not handled here: logprobs of the emitted tokens, and grammar bitmasks (the grammar must advance
through the drafts: the engine's part).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.layers.sampler import SamplingMetadata, apply_logits_processors, filtered_probs, sample_from_probs

PAD = -1  # fills RejectionSamplerOutput.token_ids past each request's emitted tokens


@dataclass
class RejectionSamplerOutput:
    token_ids: torch.Tensor  # [B, max(n_i) + 1] int64: accepted drafts, then the final token, then PAD
    num_tokens: torch.Tensor  # [B] int64: emitted tokens, num_accepted + 1
    num_accepted: torch.Tensor  # [B] int64: accepted drafts (for the acceptance metrics)
    layout: DraftLayout  # the target rows' requests and positions, for values a caller gathers per row


@dataclass
class DraftLayout:
    """Index maps between requests, target rows and draft rows (see the module docstring)."""

    num_draft_tokens: list[int]  # [B] n_i, on the host
    draft_start_host: list[int]  # [B] first draft row of each request, on the host
    num_drafts: torch.Tensor  # [B] n_i
    draft_start: torch.Tensor  # [B] first draft row of each request
    target_start: torch.Tensor  # [B] first target row of each request
    request_of_row: torch.Tensor  # [R]
    position_of_row: torch.Tensor  # [R] j
    request_of_draft: torch.Tensor  # [D]
    position_of_draft: torch.Tensor  # [D] j

    @classmethod
    def build(cls, num_draft_tokens: list[int], device: torch.device) -> DraftLayout:
        counts = np.asarray(num_draft_tokens, dtype=np.int64)
        draft_start = np.cumsum(counts) - counts
        target_start = draft_start + np.arange(len(counts))
        request_of_row = np.repeat(np.arange(len(counts)), counts + 1)
        request_of_draft = np.repeat(np.arange(len(counts)), counts)
        position_of_row = np.arange(len(request_of_row)) - target_start[request_of_row]
        position_of_draft = np.arange(len(request_of_draft)) - draft_start[request_of_draft]
        arrays = [torch.from_numpy(a).to(device) for a in (counts, draft_start, target_start, request_of_row,
                                                          position_of_row, request_of_draft, position_of_draft)]
        return cls(list(num_draft_tokens), draft_start.tolist(), *arrays)


def expand_metadata(meta: SamplingMetadata, layout: DraftLayout, draft_token_ids: torch.Tensor,
                    min_tokens_left: dict[int, int] | None, vocab_size: int) -> SamplingMetadata:
    """The metadata of every target row, for the sampler's processing steps (the rows' generators stay
    with the requests: the rejection sampler draws, not the Sampler)."""
    rows = layout.request_of_row

    def expand(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[rows]

    # Request i's target rows, from the host copies (no device sync).
    spans = [range(start + i, start + i + count + 1) for i, (start, count)
             in enumerate(zip(layout.draft_start_host, layout.num_draft_tokens))]
    if meta.min_tokens_masks and min_tokens_left is None:
        raise ValueError("requests with a min_tokens mask need min_tokens_left (min_tokens - outputs so far)")
    expanded = SamplingMetadata(
        temperature=meta.temperature[rows], top_p=expand(meta.top_p), top_k=expand(meta.top_k),
        min_p=expand(meta.min_p), all_greedy=meta.all_greedy, all_random=meta.all_random,
        logit_bias=[(row, ids, values) for i, ids, values in meta.logit_bias for row in spans[i]],
        # The stop tokens stay masked at positions j with outputs + j < min_tokens.
        min_tokens_masks=[(row, ids) for i, ids in meta.min_tokens_masks for row in spans[i][:min_tokens_left[i]]])
    if meta.output_token_ids is not None:
        expanded.output_token_ids = torch.cat(
            [meta.output_token_ids[rows], drafts_before(layout, draft_token_ids, vocab_size)], dim=1)
        expanded.prompt_token_ids = meta.prompt_token_ids[rows]
        expanded.repetition_penalties = meta.repetition_penalties[rows]
        expanded.frequency_penalties = meta.frequency_penalties[rows]
        expanded.presence_penalties = meta.presence_penalties[rows]
    return expanded


def drafts_before(layout: DraftLayout, draft_token_ids: torch.Tensor, pad: int) -> torch.Tensor:
    """[R, max(n_i)]: row (i, j) holds request i's drafts 0..j-1, then `pad`."""
    max_drafts = max(layout.num_draft_tokens, default=0)
    if max_drafts == 0:
        return torch.empty(len(layout.request_of_row), 0, dtype=torch.int64, device=draft_token_ids.device)
    cols = torch.arange(max_drafts, device=draft_token_ids.device)
    source = (layout.draft_start[layout.request_of_row, None] + cols).clamp_(max=len(draft_token_ids) - 1)
    return torch.where(cols < layout.position_of_row[:, None], draft_token_ids[source], pad)


class RejectionSampler:
    def __call__(self, target_logits: torch.Tensor, draft_token_ids: torch.Tensor, num_draft_tokens: list[int],
                 draft_probs: torch.Tensor | None, meta: SamplingMetadata,
                 min_tokens_left: dict[int, int] | None = None) -> RejectionSamplerOutput:
        """target_logits [R, V] (any float dtype; float32 logits are changed in place, as by the Sampler),
        draft_token_ids [D] int64 and draft_probs [D, V] (None: the draft is deterministic, as n-gram's), all
        on one device; num_draft_tokens [B] on the host; meta: the B requests' SamplingMetadata (logprobs are
        not computed here); min_tokens_left {request row: min_tokens minus outputs so far} for each request
        in meta.min_tokens_masks."""
        device = target_logits.device
        layout = DraftLayout.build(num_draft_tokens, device)
        expanded = expand_metadata(meta, layout, draft_token_ids, min_tokens_left, target_logits.shape[-1])
        logits = apply_logits_processors(target_logits.float(), expanded)
        argmax = None if meta.all_random else logits.argmax(dim=-1)  # [R]
        probs = None if meta.all_greedy else filtered_probs(logits, expanded)  # [R, V]
        greedy = meta.temperature == 0  # [B]

        accepted = self._accept(layout, draft_token_ids, draft_probs, argmax, probs, greedy, meta.generators)
        num_accepted = self._count_accepted(layout, accepted)
        final = self._final_tokens(layout, num_accepted, draft_token_ids, draft_probs, argmax, probs, greedy,
                                   meta.generators)

        num_reqs, width = len(num_draft_tokens), max(num_draft_tokens, default=0) + 1
        drafts = torch.full((num_reqs, width), PAD, dtype=torch.int64, device=device)
        drafts[layout.request_of_draft, layout.position_of_draft] = draft_token_ids
        cols = torch.arange(width, device=device)[None, :]
        token_ids = torch.where(cols < num_accepted[:, None], drafts,
                                torch.where(cols == num_accepted[:, None], final[:, None], PAD))
        return RejectionSamplerOutput(token_ids, num_accepted + 1, num_accepted, layout)

    @staticmethod
    def _accept(layout: DraftLayout, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                argmax: torch.Tensor | None, probs: torch.Tensor | None, greedy: torch.Tensor,
                generators: dict[int, torch.Generator]) -> torch.Tensor:
        """[D] bool: whether each draft passes its own test (acceptance stops at a request's first failure)."""
        draft_rows = torch.arange(len(draft_token_ids), device=draft_token_ids.device)
        verifier = layout.request_of_draft + draft_rows
        if probs is None:
            return draft_token_ids == argmax[verifier]
        p = probs[verifier, draft_token_ids]
        q = 1.0 if draft_probs is None else draft_probs[draft_rows, draft_token_ids]
        # u in [0, 1): u * q < p holds with probability min(1, p / q), and never when p = 0.
        u = torch.rand(len(draft_token_ids), device=draft_token_ids.device)
        for row, generator in generators.items():
            start, count = layout.draft_start_host[row], layout.num_draft_tokens[row]
            u[start:start + count] = torch.rand(count, device=u.device, generator=generator)
        random_accept = u * q < p
        if argmax is None:
            return random_accept
        return torch.where(greedy[layout.request_of_draft], draft_token_ids == argmax[verifier], random_accept)

    @staticmethod
    def _count_accepted(layout: DraftLayout, accepted: torch.Tensor) -> torch.Tensor:
        """[B]: the length of each request's run of accepted drafts."""
        grid = torch.zeros(len(layout.num_draft_tokens), max(layout.num_draft_tokens, default=0), dtype=torch.int64,
                           device=accepted.device)
        grid[layout.request_of_draft, layout.position_of_draft] = accepted.long()
        return grid.cumprod(dim=1).sum(dim=1)

    @staticmethod
    def _final_tokens(layout: DraftLayout, num_accepted: torch.Tensor, draft_token_ids: torch.Tensor,
                      draft_probs: torch.Tensor | None, argmax: torch.Tensor | None, probs: torch.Tensor | None,
                      greedy: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
        """[B]: the token after the accepted drafts, from the position of the first rejection (or the bonus)."""
        row = layout.target_start + num_accepted
        if probs is None:
            return argmax[row]
        target = probs[row]  # [B, V], a copy
        rejected = num_accepted < layout.num_drafts
        if len(draft_token_ids):
            draft_row = (layout.draft_start + num_accepted).clamp_(max=len(draft_token_ids) - 1)
            if draft_probs is None:
                residual = target.scatter(1, draft_token_ids[draft_row, None], 0.0)
            else:
                residual = (target - draft_probs[draft_row]).clamp_(min=0.0)
            # Zero mass only when p == q up to rounding, where a rejection is itself a rounding artefact.
            rejected &= residual.sum(dim=-1) > 0
            target = torch.where(rejected[:, None], residual, target)
        sampled = sample_from_probs(target, generators)
        return sampled if argmax is None else torch.where(greedy, argmax[row], sampled)
