"""The rejection sampler against the Sampler: greedy rows emit what step-by-step greedy decoding emits
(penalties, logit bias and min_tokens included); random rows emit tokens distributed as the target
(chi-square over many draws with fixed seeds); seeded rows do not depend on the batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from tokenmill.layers.sampler import Sampler, SamplingMetadata, apply_logits_processors, filtered_probs
from tokenmill.spec_decode.rejection_sampler import PAD, DraftLayout, RejectionSampler, expand_metadata

VOCAB = 50
# Chi-square critical values at significance 0.001 by degrees of freedom: a correct sampler fails one seed in
# a thousand, and the seeds are fixed.
CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@dataclass
class Req:
    drafts: list[int]
    temperature: float = 0.0
    outputs: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=lambda: [1, 2])
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)


def metadata(reqs: list[Req], outputs: list[list[int]]) -> tuple[SamplingMetadata, dict[int, int]]:
    """What SamplingInputs.build makes of these requests with these outputs so far, and min_tokens_left."""
    temperature = torch.tensor([r.temperature for r in reqs])
    meta = SamplingMetadata(temperature=temperature, top_p=None, top_k=None, min_p=None,
                            all_greedy=bool((temperature == 0).all()), all_random=bool((temperature > 0).all()))
    min_tokens_left = {}
    for i, (req, out) in enumerate(zip(reqs, outputs)):
        if req.logit_bias:
            meta.logit_bias.append((i, list(req.logit_bias), list(req.logit_bias.values())))
        if len(out) < req.min_tokens and req.stop_token_ids:
            meta.min_tokens_masks.append((i, req.stop_token_ids))
            min_tokens_left[i] = req.min_tokens - len(out)
    if any(r.repetition_penalty != 1 or r.frequency_penalty or r.presence_penalty for r in reqs):
        def padded(lists: list[list[int]]) -> torch.Tensor:
            width = max(1, max(len(x) for x in lists))
            return torch.tensor([x + [VOCAB] * (width - len(x)) for x in lists])

        meta.output_token_ids, meta.prompt_token_ids = padded(outputs), padded([r.prompt for r in reqs])
        meta.repetition_penalties = torch.tensor([r.repetition_penalty for r in reqs])
        meta.frequency_penalties = torch.tensor([r.frequency_penalty for r in reqs])
        meta.presence_penalties = torch.tensor([r.presence_penalty for r in reqs])
    return meta, min_tokens_left


def greedy_step(req: Req, logits_row: torch.Tensor, outputs: list[int]) -> int:
    meta, _ = metadata([req], [outputs])
    return Sampler()(logits_row[None].clone(), meta).sampled_token_ids.item()


def greedy_reference(req: Req, rows: torch.Tensor) -> list[int]:
    """Step-by-step greedy decoding through the Sampler, drafts taken while they agree."""
    for j in range(len(req.drafts) + 1):
        token = greedy_step(req, rows[j], req.outputs + req.drafts[:j])
        if j == len(req.drafts) or token != req.drafts[j]:
            return req.drafts[:j] + [token]


def run(reqs: list[Req], logits: torch.Tensor, draft_probs: torch.Tensor | None = None):
    meta, min_tokens_left = metadata(reqs, [r.outputs for r in reqs])
    drafts = torch.tensor([t for r in reqs for t in r.drafts], dtype=torch.int64)
    return RejectionSampler()(logits.clone(), drafts, [len(r.drafts) for r in reqs], draft_probs, meta,
                              min_tokens_left)


def emitted(out, row: int) -> list[int]:
    return out.token_ids[row, :out.num_tokens[row]].tolist()


def greedy_requests(logits_of) -> list[Req]:
    """Drafts that agree fully, partly and not at all, under penalties, logit bias and min_tokens, n_i = 0."""
    reqs = []
    for i, (kind, num_drafts, extra) in enumerate([
        ("full", 3, {}),
        ("part", 3, {"outputs": [5, 6], "repetition_penalty": 1.3, "frequency_penalty": 1.5,
                     "presence_penalty": 0.5}),
        ("none", 2, {"logit_bias": {7: 5.0, 8: -2.0}}),
        ("full", 0, {}),
        ("full", 3, {"frequency_penalty": 2.0, "presence_penalty": 1.0}),  # identical rows: penalties decide
        ("full", 3, {"min_tokens": 2, "stop_token_ids": [9]}),  # token 9 tops every row: masked at 0 and 1
    ]):
        req = Req(drafts=[], **extra)
        rows = logits_of(i, num_drafts + 1)
        chain = []
        for j in range(num_drafts):
            chain.append(greedy_step(req, rows[j], req.outputs + chain))
        if kind == "part":
            chain[1] = (chain[1] + 1) % VOCAB
        if kind == "none":
            chain[0] = (chain[0] + 1) % VOCAB
        req.drafts = chain
        reqs.append(req)
    return reqs


def greedy_logits() -> tuple[list[Req], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    blocks = {}

    def logits_of(i: int, num_rows: int) -> torch.Tensor:
        rows = 3 * torch.randn(num_rows, VOCAB, generator=generator)
        if i in (4, 5):
            rows = rows[:1].repeat(num_rows, 1)
            rows[:, 9] = rows.max() + 1.0
        blocks[i] = rows
        return rows

    reqs = greedy_requests(logits_of)
    return reqs, torch.cat([blocks[i] for i in range(len(reqs))])


def test_greedy_rows_emit_step_by_step_argmax():
    reqs, logits = greedy_logits()
    out = run(reqs, logits)
    start = 0
    for row, req in enumerate(reqs):
        expected = greedy_reference(req, logits[start:start + len(req.drafts) + 1])
        assert emitted(out, row) == expected, row
        assert out.num_accepted[row] == len(expected) - 1
        assert (out.token_ids[row, len(expected):] == PAD).all()
        start += len(req.drafts) + 1
    assert out.num_accepted.tolist() == [3, 1, 0, 0, 3, 3]
    assert len(set(reqs[4].drafts)) > 1  # the penalties changed the argmax along the drafts
    assert reqs[5].drafts[:2] != [9, 9] and reqs[5].drafts[2] == 9  # the min_tokens mask lifted at position 2


def test_greedy_rows_are_the_same_in_a_mixed_batch():
    reqs, logits = greedy_logits()
    alone = run(reqs, logits)
    mixed = run(reqs + [Req(drafts=[1, 2], temperature=1.0)], torch.cat([logits, torch.randn(3, VOCAB)]),
                draft_probs=torch.full((sum(len(r.drafts) for r in reqs) + 2, VOCAB), 1 / VOCAB))
    assert torch.equal(mixed.token_ids[:len(reqs)], alone.token_ids)


def test_expanded_rows_match_per_position_metadata():
    """Random rows: the distribution at position j is the Sampler's for the outputs plus drafts 0..j-1."""
    reqs, logits = greedy_logits()
    for req in reqs:
        req.temperature = 0.8
    meta, min_tokens_left = metadata(reqs, [r.outputs for r in reqs])
    meta.top_k = torch.tensor([5, VOCAB, 10, VOCAB, 20, 3])
    drafts = torch.tensor([t for r in reqs for t in r.drafts])
    layout = DraftLayout.build([len(r.drafts) for r in reqs], torch.device("cpu"))
    expanded = expand_metadata(meta, layout, drafts, min_tokens_left, VOCAB)
    got = filtered_probs(apply_logits_processors(logits.clone(), expanded), expanded)
    row = 0
    for i, req in enumerate(reqs):
        for j in range(len(req.drafts) + 1):
            single, _ = metadata([req], [req.outputs + req.drafts[:j]])
            single.top_k = meta.top_k[i:i + 1]
            expected = filtered_probs(apply_logits_processors(logits[row:row + 1].clone(), single), single)
            assert torch.allclose(got[row], expected[0], atol=1e-6), (i, j)
            row += 1


def test_no_drafts_is_plain_sampling():
    reqs, logits = greedy_logits()
    rows = torch.stack([logits[0], logits[4]])
    out = run([Req(drafts=[]), Req(drafts=[], logit_bias={3: 50.0})], rows)
    assert out.token_ids.shape == (2, 1) and out.num_tokens.tolist() == [1, 1]
    assert out.token_ids[:, 0].tolist() == [logits[0].argmax().item(), 3]


# ---- distributions (V = 8) ----

P = torch.tensor([[0.30, 0.20, 0.15, 0.10, 0.10, 0.07, 0.05, 0.03],
                  [0.04, 0.06, 0.25, 0.05, 0.30, 0.10, 0.12, 0.08],
                  [0.05, 0.22, 0.08, 0.16, 0.11, 0.18, 0.06, 0.14]])
NUM_DRAWS = 20000


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    expected = probs[support].double() * len(samples)
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def assert_follows(samples: torch.Tensor, probs: torch.Tensor) -> None:
    assert len(samples) >= 1000
    stat, dof = chi_square(samples, probs)
    assert stat < CRITICAL[dof], (stat, dof)


def sample_many(target: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                meta: SamplingMetadata):
    """Every row the same request: target logits [n + 1, V], draft tokens [N, n], draft probs [n, V]."""
    num, n = draft_tokens.shape
    torch.manual_seed(1)
    return RejectionSampler()(target.repeat(num, 1), draft_tokens.flatten(), [n] * num,
                              None if draft_probs is None else draft_probs.repeat(num, 1), meta)


def random_meta(num: int, **filters) -> SamplingMetadata:
    return SamplingMetadata(temperature=torch.ones(num), top_p=None, top_k=None, min_p=None, all_greedy=False,
                            all_random=True, **filters)


def draw_drafts(q: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.multinomial(q_j, NUM_DRAWS, replacement=True, generator=generator) for q_j in q], 1)


UNIFORM = torch.full((2, 8), 0.125)
DISAGREE = torch.tensor([[0.02, 0.03, 0.05, 0.05, 0.10, 0.15, 0.25, 0.35],
                         [0.40, 0.30, 0.02, 0.10, 0.02, 0.06, 0.05, 0.05]])
DRAFTS = {"equal": P[:2], "partly agree": 0.5 * P[:2] + 0.5 * UNIFORM, "disagree": DISAGREE}


def check_positions(out, target: torch.Tensor) -> None:
    """First token ~ p0; second, given the first draft accepted, ~ p1; bonus, given both accepted, ~ p2."""
    tokens, accepted = out.token_ids, out.num_accepted
    assert_follows(tokens[:, 0], target[0])
    assert_follows(tokens[accepted >= 1, 1], target[1])
    if (accepted == 2).sum() >= 1000:
        assert_follows(tokens[accepted == 2, 2], target[2])


@pytest.mark.parametrize("name", list(DRAFTS))
def test_emitted_tokens_follow_the_target(name):
    q = DRAFTS[name]
    out = sample_many(P.log(), draw_drafts(q, seed=2), q, random_meta(NUM_DRAWS))
    check_positions(out, P)
    if name != "equal":  # the test tells the draft's distribution from the target's
        assert chi_square(out.token_ids[:, 0], q[0])[0] > 10 * CRITICAL[7]
    else:
        assert (out.num_accepted == 2).all()


def test_ngram_drafts_follow_the_target():
    """A deterministic draft (q one-hot): accepted with probability p(x), else the residual without x."""
    drafts = torch.tensor([[1, 4]]).repeat(NUM_DRAWS, 1)
    out = sample_many(P.log(), drafts, None, random_meta(NUM_DRAWS))
    check_positions(out, P)
    acceptance = (out.num_accepted >= 1).double().mean().item()
    assert abs(acceptance - P[0, 1].item()) < 0.015


def test_filtered_rows_follow_the_processed_distribution():
    """Temperature, top-k and top-p rows: the target is the filtered distribution; tokens outside it never
    come out, even when drafted."""
    logits = P.log()
    temperature, top_k, top_p = 0.7, 5, 0.8
    probs = (logits / temperature).softmax(-1)
    expected = torch.zeros_like(probs)
    for j, row in enumerate(probs):
        order = row.argsort(descending=True)[:top_k]
        top = row[order] / row[order].sum()  # top-p applies to the top-k renormalized
        kept = order[:int((top.cumsum(0) < top_p).sum()) + 1]  # the nucleus: until top_p is reached
        expected[j, kept] = row[kept] / row[kept].sum()
    meta = random_meta(NUM_DRAWS)
    meta.temperature = torch.full((NUM_DRAWS,), temperature)
    meta.top_k = torch.full((NUM_DRAWS,), top_k)
    meta.top_p = torch.full((NUM_DRAWS,), top_p)
    out = sample_many(logits, draw_drafts(UNIFORM, seed=3), UNIFORM, meta)
    assert (expected > 0).sum(-1).tolist() != [8, 8, 8]  # the filters cut something
    check_positions(out, expected)


def test_seeded_rows_do_not_depend_on_the_batch():
    q = DISAGREE
    num_rejected = 0
    for seed in range(20):
        drafts = draw_drafts(q, seed)[:1, :]
        seeded = {"temperature": torch.ones(1), "top_p": None, "top_k": None, "min_p": None, "all_greedy": False}

        torch.manual_seed(100 + seed)
        alone = RejectionSampler()(P.log().clone(), drafts[0], [2], q,
                                   SamplingMetadata(**seeded, generators={0: torch.Generator().manual_seed(seed)}))
        # In a batch, behind other requests with other counts, the global RNG in another state.
        others = torch.randn(3, 8)
        torch.manual_seed(200 + seed)
        batch = RejectionSampler()(
            torch.cat([others, P.log()]), torch.cat([torch.tensor([3]), drafts[0]]), [1, 0, 2],
            torch.cat([UNIFORM[:1], q]),
            SamplingMetadata(temperature=torch.ones(3), top_p=None, top_k=None, min_p=None, all_greedy=False,
                             generators={2: torch.Generator().manual_seed(seed)}))
        assert torch.equal(batch.token_ids[2], alone.token_ids[0]), seed
        num_rejected += int(alone.num_accepted[0] < 2)
    assert 0 < num_rejected < 20  # both the residual and the bonus draws were exercised


def test_ragged_counts_and_padding():
    counts = [0, 2, 0, 3, 1]
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(sum(counts) + len(counts), 8, generator=generator)
    drafts = torch.randint(0, 8, (sum(counts),), generator=generator)
    meta = SamplingMetadata(temperature=torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0]), top_p=None, top_k=None,
                            min_p=None, all_greedy=False)
    out = RejectionSampler()(logits, drafts, counts, None, meta)
    assert out.token_ids.shape == (5, 4)
    start = 0
    for row, n in enumerate(counts):
        accepted = int(out.num_accepted[row])
        assert 0 <= accepted <= n and out.num_tokens[row] == accepted + 1
        assert out.token_ids[row, :accepted].tolist() == drafts[start:start + accepted].tolist()
        assert 0 <= out.token_ids[row, accepted] < 8 and (out.token_ids[row, accepted + 1:] == PAD).all()
        start += n
