"""The draft-model proposer: a smaller model with the target's vocabulary proposes k tokens per request. It runs
in the target's runner, on its device, over the target's block table: its own KV pool with the same block ids,
so the scheduler's blocks hold both models' keys and values (and reserve k slots past each step's tokens for
the draft's guesses).

After each step, for the requests that sampled:
  1. catch-up: one forward over every request's tokens the draft has not computed (a new request's whole
     prompt; later the tokens accepted in the last step and the one after them), logits at each request's last;
  2. then k - 1 forwards of one token a request, each fed the previous draft token.
Greedy requests take the draft's argmax; sampled ones draw from the draft's distribution under their own
temperature, min-p, top-k and top-p (and seed), and those probabilities (q) are kept for the rejection sampler.
The draft's keys and values past a request's real tokens are guesses: `computed` stops at the request's length,
so the next catch-up recomputes from there. Prefix-cache hits are recomputed by the draft (its pool is not
cached), which is cheap for a small model.

EAGLE heads (eagle.py) run through the same steps, reading token t at position t - 1 (token_shift) beside a
hidden state (_run_model).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend
from tokenmill.config import EngineConfig
from tokenmill.forward_context import set_forward_context
from tokenmill.layers.attention import Attention
from tokenmill.layers.sampler import SamplingMetadata, filtered_probs, sample_from_probs
from tokenmill.loader.model_loader import load_model
from tokenmill.source import resolve_model
from tokenmill.worker.input_batch import InputBatch
from tokenmill.worker.kv_cache import KVCache
from tokenmill.worker.step_inputs import made_up_metadata


def load_draft_model(config: EngineConfig, target_vocab_size: int, device: torch.device, dtype: torch.dtype
                     ) -> nn.Module:
    """The speculative_config's draft model, which must share the target's vocabulary."""
    spec = config.speculative_config
    source = resolve_model(spec.model)
    vocab_size = source.hf_config.vocab_size
    if vocab_size != target_vocab_size:
        raise ValueError(f"speculative_config.model {spec.model!r} has a vocabulary of {vocab_size} tokens; the "
                         f"target's has {target_vocab_size}: a draft model must share the target's vocabulary")
    model_config = dataclasses.replace(config.model, max_model_len=config.scheduler.max_model_len,
                                       quantization=spec.quantization)
    return load_model(source, model_config, dtype, device)


class DraftModelProposer:
    # The draft reads token t at position t - token_shift: 0 for a draft model; 1 for EAGLE heads, which
    # read it beside the target's hidden state at the position before it (spec_decode/eagle.py).
    token_shift = 0

    def __init__(self, config: EngineConfig, model: nn.Module, device: torch.device, kv_cache_dtype: torch.dtype,
                 backend: AttentionBackend) -> None:
        """model: the draft (load_draft_model), its attention layers' KV pool made here."""
        self.k = config.speculative_config.num_speculative_tokens
        self.max_model_len = config.scheduler.max_model_len
        self.block_size = config.cache.block_size
        self.device, self.backend = device, backend
        self.model = model
        self.kv_cache = KVCache([m for m in self.model.modules() if isinstance(m, Attention)], self.block_size,
                                kv_cache_dtype, device)
        self.computed: dict[str, int] = {}  # request -> leading positions whose draft KV holds its real tokens
        self.probs: dict[str, torch.Tensor] = {}  # sampled request -> q of its drafts [num drafts, vocab]

    def forget(self, req_id: str) -> None:
        """A request finished or preempted (its blocks, and so the draft's KV, are gone)."""
        self.computed.pop(req_id, None)
        self.probs.pop(req_id, None)

    @torch.inference_mode()
    def propose(self, batch: InputBatch, rows: list[int], meta: SamplingMetadata) -> list[list[int]]:
        """Drafts for the requests in batch `rows` (meta: their SamplingMetadata, in that order)."""
        req_ids = [batch.req_ids[r] for r in rows]
        num_tokens = batch.num_tokens[rows].astype(np.int64)
        starts = np.array([self._catch_up_start(req_id, int(n)) for req_id, n in zip(req_ids, num_tokens)])
        # Up to k drafts, none past max_model_len (the scheduler would drop them, and they have no slots).
        limits = np.minimum(self.k, self.max_model_len - num_tokens)
        logits = self._forward(batch, rows, starts, num_tokens, None, None)
        drafts, probs = [], []
        for j in range(self.k):
            token, q = self._sample(logits, meta)
            drafts.append(token.cpu().numpy())
            probs.append(q)
            active = limits > j + 1
            if j + 1 == self.k or not active.any():
                break
            # Draft j + 1 from draft j, which sits after the request's tokens and the drafts before it.
            logits = self._forward(batch, rows, num_tokens + j, num_tokens + j + 1, token, active)
        for req_id, n in zip(req_ids, num_tokens):
            self.computed[req_id] = int(n)
        proposals = []
        sampled = (meta.temperature > 0).tolist()
        for i, req_id in enumerate(req_ids):
            count = int(max(0, limits[i]))
            proposals.append([int(d[i]) for d in drafts[:count]])
            if probs[0] is not None and sampled[i] and count:
                self.probs[req_id] = torch.stack([q[i] for q in probs[:count]])
        return proposals

    def _catch_up_start(self, req_id: str, num_tokens: int) -> int:
        """The first token of the request the catch-up forward reads (at least its last)."""
        return min(self.computed.get(req_id, 0), num_tokens - 1)

    def _forward(self, batch: InputBatch, rows: list[int], starts: np.ndarray, ends: np.ndarray,
                 last_drafts: torch.Tensor | None, active: np.ndarray | None) -> torch.Tensor:
        """Logits at each request's last row of a forward over its tokens [starts, ends) (at positions
        token_shift before them), or with last_drafts one draft token each, where `active` (the others, out of
        drafts, run at a valid position, write no KV, and their logits are not used)."""
        if active is not None:
            ends = np.where(active, ends, self.max_model_len)
            starts = ends - 1
        q_lens = (ends - starts).tolist()
        order = sorted(range(len(rows)), key=lambda i: q_lens[i] > 1)  # one-token requests first
        tokens = np.concatenate([np.arange(starts[i], ends[i]) for i in order])
        positions = tokens - self.token_shift
        request_rows = np.repeat([rows[i] for i in order], [q_lens[i] for i in order])
        bs = self.block_size
        slots = batch.block_table[request_rows, positions // bs].astype(np.int64) * bs + positions % bs
        if active is not None:
            slots[~active[order]] = -1
        metadata, positions_t = made_up_metadata([q_lens[i] for i in order],
                                                 [int(ends[i]) - self.token_shift for i in order],
                                                 torch.from_numpy(batch.block_table[[rows[i] for i in order]]),
                                                 torch.from_numpy(slots), self.max_model_len, self.device)
        order_t = torch.tensor(order, device=self.device)
        if last_drafts is None:
            input_ids = torch.from_numpy(batch.token_ids[request_rows, tokens].astype(np.int64)).to(self.device)
        else:
            input_ids = last_drafts[order_t]
        last = torch.tensor(np.cumsum([q_lens[i] for i in order]) - 1, device=self.device)
        with set_forward_context(metadata, self.backend):
            spans = [(batch.req_ids[rows[i]], int(starts[i]) - self.token_shift, int(ends[i]) - self.token_shift)
                     for i in order]
            hidden_states = self._run_model(input_ids, positions_t, spans, order_t, last,
                                            chained=last_drafts is not None)
        logits = self.model.compute_logits(hidden_states)
        unsorted = torch.empty_like(logits)
        unsorted[order_t] = logits
        return unsorted

    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, spans: list[tuple[str, int, int]],
                   order: torch.Tensor, last: torch.Tensor, chained: bool) -> torch.Tensor:
        """The draft's hidden states at rows `last` (each request's last) of a forward over input_ids: spans
        are the requests' (id, first position, end position) in the forward's order, request order[i] of
        propose()'s in place i; chained: one draft token each, after the forward before."""
        return self.model(input_ids, positions)[last]

    @staticmethod
    def _sample(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft token per request, and the distribution it came from (None when every request is greedy)."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy, None
        probs = filtered_probs(logits, meta)
        sampled = sample_from_probs(probs.clone(), meta.generators)
        return torch.where(meta.temperature == 0, greedy, sampled), probs
