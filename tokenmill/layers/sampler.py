"""Batched sampling on the logits' device.

Order of operations, per row of logits [num_reqs, vocab]:
  1. upcast to float32; if logprobs were asked for, take log_softmax of these raw logits
  2. logit_bias
  3. min_tokens: stop tokens masked to -inf until the request has min_tokens outputs
  4. penalties over the output tokens: repetition (prompt and output, HF rule), frequency, presence
  5. greedy rows (temperature 0) take the argmax here
  6. temperature
  7. min_p, then top_k, then top_p (on the sorted distribution)
  8. sample: on GPU by the exponential race argmax(p / q), q ~ Exp(1); on CPU by the inverse CDF (one
     uniform per row instead of one per vocab entry); seeded rows draw from their own generator, so a
     seeded request samples the same tokens whatever batch it runs in
On GPU, when no row uses top-k, top-p, min-p or a seed (the common case), steps 1 and 5-8 are two Triton
kernels that read the logits in their own dtype: greedy rows take the argmax, the others an inverse-CDF
draw from softmax(logits / T) with one uniform per row (triton_ops.sample_from_logits).
There is one device-to-host copy per step: the caller's `.tolist()` of the result.
Steps 2-4, 6-7 and 8 are the functions apply_logits_processors, filtered_probs and sample_from_probs, which
the rejection sampler (spec_decode/rejection_sampler.py) reuses so that speculation samples from the same
distributions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32; exactly 0 for greedy rows (SamplingParams.greedy decides which)
    top_p: torch.Tensor | None  # [B] float32, None if no row uses it
    top_k: torch.Tensor | None  # [B] int64 (vocab size = off), None if no row uses it
    min_p: torch.Tensor | None  # [B] float32, None if no row uses it
    all_greedy: bool
    all_random: bool = False  # no greedy row: the argmax over the raw logits is skipped
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator
    max_num_logprobs: int | None = None  # None: no row wants logprobs
    logit_bias: list[tuple[int, list[int], list[float]]] = field(default_factory=list)  # (row, ids, values)
    min_tokens_masks: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, stop ids to block)
    # Penalties; None if no row uses them.
    output_token_ids: torch.Tensor | None = None  # [B, max_out] int64, padded with vocab_size
    prompt_token_ids: torch.Tensor | None = None  # [B, max_prompt] int64, padded with vocab_size
    repetition_penalties: torch.Tensor | None = None  # [B]
    frequency_penalties: torch.Tensor | None = None  # [B]
    presence_penalties: torch.Tensor | None = None  # [B]


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # When logprobs were requested: ids/logprobs [B, 1 + k] (sampled first, then top-k), ranks [B]
    logprob_token_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata, bitmask: torch.Tensor | None = None
                 ) -> SamplerOutput:
        """`bitmask` (a grammar's, [B, ceil(vocab / 32)] int32 on the logits' device, all ones in unconstrained
        rows) sets the logits of disallowed tokens to -inf before anything else (logprobs included, as in
        vLLM): inside the fused kernel when that samples and no logprobs are asked for, else in place."""
        fused = logits.is_cuda and meta.top_k is None and meta.top_p is None and meta.min_p is None \
            and not meta.generators
        if not fused or meta.max_num_logprobs is not None or meta.logit_bias or meta.min_tokens_masks \
                or meta.output_token_ids is not None:
            logits = logits.float()  # the fused kernel alone reads the logits in their own dtype
        if bitmask is not None and (not fused or meta.max_num_logprobs is not None):
            import xgrammar as xgr

            xgr.apply_token_bitmask_inplace(logits, bitmask)
            bitmask = None
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs is not None else None
        logits = apply_logits_processors(logits, meta)
        if fused:
            from tokenmill.layers.triton_ops import sample_from_logits

            seed = 0 if meta.all_greedy else int(torch.randint(0, 2**31 - 1, ()).item())  # host RNG: no sync
            sampled = sample_from_logits(logits, meta.temperature, seed, bitmask=bitmask)
        elif meta.all_greedy:
            sampled = logits.argmax(dim=-1)
        elif meta.all_random:
            sampled = sample_from_probs(filtered_probs(logits, meta), meta.generators)
        else:
            greedy = logits.argmax(dim=-1)
            sampled = torch.where(meta.temperature == 0, greedy,
                                  sample_from_probs(filtered_probs(logits, meta), meta.generators))
        out = SamplerOutput(sampled)
        if raw_logprobs is not None:
            out.logprob_token_ids, out.logprobs, out.sampled_ranks = gather_logprobs(
                raw_logprobs, sampled, meta.max_num_logprobs)
        return out


def apply_logits_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 2-4 (logit_bias, min_tokens, penalties) on float32 logits; bias and masks are applied in place."""
    for row, token_ids, values in meta.logit_bias:
        ids = torch.tensor(token_ids, device=logits.device)
        logits[row, ids] += torch.tensor(values, device=logits.device)
    for row, token_ids in meta.min_tokens_masks:
        logits[row, torch.tensor(token_ids, device=logits.device)] = float("-inf")
    if meta.output_token_ids is not None:
        logits = apply_penalties(logits, meta)
    return logits


def filtered_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 6-7: the distribution a random row samples from (greedy rows get temperature 1 here)."""
    temperature = torch.where(meta.temperature == 0, 1.0, meta.temperature)
    logits = logits / temperature.unsqueeze(1)
    if meta.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * meta.min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if meta.top_k is not None or meta.top_p is not None:
        logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return logits.softmax(dim=-1)


def sample_from_probs(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Step 8: one token per row, in proportion to `probs` (rows need not sum to 1; on GPU `probs` is
    overwritten). Seeded rows draw from their own generator."""
    if not probs.is_cuda:
        # On CPU, inverse-CDF sampling draws one uniform per row instead of one per vocab entry.
        u = 1.0 - torch.rand(probs.shape[0], 1)  # in (0, 1], so a zero-probability first token is never hit
        for row, generator in generators.items():
            u[row] = 1.0 - torch.rand(1, generator=generator)
        cdf = probs.cumsum(dim=-1)
        return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=probs.shape[-1] - 1)
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    return probs.div_(q).argmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks to -inf everything outside each row's top-k and top-p nucleus (at least one token kept)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k.clamp(1, vocab)).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    num_rows, vocab = logits.shape
    # One extra column absorbs the padding id (= vocab).
    output_counts = torch.zeros(num_rows, vocab + 1, device=logits.device)
    output_counts.scatter_add_(1, meta.output_token_ids, torch.ones_like(meta.output_token_ids, dtype=torch.float32))
    output_counts = output_counts[:, :vocab]
    seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, meta.prompt_token_ids, True)
    seen = seen[:, :vocab] | (output_counts > 0)
    repetition = meta.repetition_penalties.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    logits = logits - meta.frequency_penalties.unsqueeze(1) * output_counts
    return logits - meta.presence_penalties.unsqueeze(1) * (output_counts > 0).float()


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int):
    """([B, 1 + k] ids, [B, 1 + k] logprobs, [B] ranks): the given token first, then the top-k."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if k > 0:
        top_values, top_ids = logprobs.topk(k, dim=-1)
        ids = torch.cat([token_ids.unsqueeze(1), top_ids], dim=1)
        values = torch.cat([chosen, top_values], dim=1)
    else:
        ids, values = token_ids.unsqueeze(1), chosen
    return ids, values, ranks
