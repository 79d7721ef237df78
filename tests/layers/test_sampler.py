"""Sampler pieces against straightforward per-row references."""

from __future__ import annotations

import torch

from tokenmill.layers.sampler import Sampler, SamplingMetadata, apply_penalties, apply_top_k_top_p


def test_top_k_top_p_keep_exactly_the_reference_sets():
    torch.manual_seed(0)
    logits = torch.randn(6, 50, dtype=torch.float64)
    top_k = torch.tensor([1, 5, 50, 10, 3, 50])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 0.2, 0.01], dtype=torch.float64)
    out = apply_top_k_top_p(logits.clone(), top_k, top_p)
    for row in range(6):
        order = logits[row].argsort(descending=True)
        keep = set(order[:top_k[row]].tolist())
        probs = logits[row, order[:top_k[row]]].softmax(-1)
        cumulative, nucleus = 0.0, set()
        for token, p in zip(order[:top_k[row]].tolist(), probs.tolist()):
            nucleus.add(token)
            cumulative += p
            if cumulative >= top_p[row] - 1e-12:
                break
        kept = set(torch.nonzero(out[row] > float("-inf")).flatten().tolist())
        assert kept == keep & nucleus, row


def test_penalties_match_definition():
    torch.manual_seed(1)
    vocab = 20
    logits = torch.randn(2, vocab)
    prompt = torch.tensor([[1, 2, 3, vocab], [4, vocab, vocab, vocab]])
    output = torch.tensor([[3, 3, 5], [6, 4, vocab]])
    meta = SamplingMetadata(temperature=torch.ones(2), top_p=None, top_k=None, min_p=None, all_greedy=False,
                            output_token_ids=output, prompt_token_ids=prompt,
                            repetition_penalties=torch.tensor([1.5, 1.0]),
                            frequency_penalties=torch.tensor([0.5, 0.25]),
                            presence_penalties=torch.tensor([0.1, 1.0]))
    got = apply_penalties(logits.clone(), meta)
    expected = logits.clone()
    for row in range(2):
        out_tokens = [t for t in output[row].tolist() if t < vocab]
        seen = {t for t in prompt[row].tolist() if t < vocab} | set(out_tokens)
        for token in range(vocab):
            value = expected[row, token].item()
            if token in seen:
                rp = meta.repetition_penalties[row].item()
                value = value / rp if value > 0 else value * rp
            count = out_tokens.count(token)
            value -= meta.frequency_penalties[row].item() * count
            value -= meta.presence_penalties[row].item() * (count > 0)
            expected[row, token] = value
    assert torch.allclose(got, expected, atol=1e-6)


def test_seeded_rows_follow_their_generator_and_greedy_rows_argmax():
    torch.manual_seed(2)
    logits = torch.randn(3, 1000)
    def meta(gen):
        return SamplingMetadata(temperature=torch.tensor([1.0, 0.0, 1.0]), top_p=None, top_k=None, min_p=None,
                                all_greedy=False, generators={0: gen})
    sampler = Sampler()
    first = sampler(logits, meta(torch.Generator().manual_seed(5))).sampled_token_ids
    second = sampler(logits, meta(torch.Generator().manual_seed(5))).sampled_token_ids
    assert first[0] == second[0]
    assert first[1] == logits[1].argmax()


def test_sampling_distribution_follows_temperature_and_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    meta = SamplingMetadata(temperature=torch.ones(4000), top_p=None, top_k=None,
                            min_p=torch.full((4000,), 0.2), all_greedy=False)
    torch.manual_seed(3)
    counts = torch.bincount(Sampler()(logits, meta).sampled_token_ids, minlength=4).float() / 4000
    # min_p 0.2 of the top 0.5 drops everything under 0.1: renormalized [0.526, 0.316, 0.158, 0]
    assert counts[3] == 0
    assert torch.allclose(counts[:3], torch.tensor([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]), atol=0.03)
