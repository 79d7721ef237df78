"""N-gram (prompt lookup) proposer: drafts by copying what followed an earlier occurrence of the sequence's tail.

For each request, over its tokens so far (prompt + outputs) t[0:T]:
  1. the n-gram is the longest suffix t[T-n:T], prompt_lookup_min <= n <= prompt_lookup_max, that also occurs
     earlier, at t[a:a+n] with a + n <= T - 1 (it may overlap the suffix itself);
  2. of that n-gram's earlier occurrences, the earliest (smallest a) is used, as vLLM's NgramProposer does;
  3. the draft is t[a+n : a+n+k], cut at the end of the sequence and at max_model_len - T tokens.
A request with no such n-gram (or shorter than prompt_lookup_min) proposes nothing.

Vectorized over the batch in numpy, O(batch x longest x prompt_lookup_max): step t of the loop compares the
token t places before every candidate end position e with the suffix's (t+1)-th last token, so after the
loop match_len[b, e] is the length of the longest common suffix of t[:e+1] and t[:T], capped at the max.
"""

from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, num_speculative_tokens: int,
                 max_model_len: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len

    def propose(self, token_ids: np.ndarray, num_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """token_ids [B, L] (row b's tokens in its first num_tokens[b] columns, L >= max(num_tokens); pass
        a basic slice of the persistent batch to avoid a copy), num_tokens [B].
        Returns the drafts [B, k] (token_ids' dtype, padded with -1) and their counts [B] (0: no draft)."""
        num_tokens = np.asarray(num_tokens, dtype=np.int64)
        num_reqs = len(num_tokens)
        drafts = np.full((num_reqs, self.k), -1, dtype=token_ids.dtype)
        longest = int(num_tokens.max(initial=0))
        if num_reqs == 0 or longest < 2:
            return drafts, np.zeros(num_reqs, dtype=np.int64)
        tokens = token_ids[:, :longest]
        rows = np.arange(num_reqs)
        # Candidate occurrence ends e: the n-gram must end before the last token, so that a token follows it.
        ends = np.arange(longest)
        matching = ends[None, :] <= num_tokens[:, None] - 2
        match_len = np.zeros((num_reqs, longest), dtype=np.int64)
        for t in range(self.max_n):
            last = tokens[rows, np.maximum(num_tokens - 1 - t, 0)]  # the suffix's (t+1)-th last token
            matching[:, :t] = False  # the occurrence would start before t[0]
            matching[:, t:] &= tokens[:, :longest - t] == last[:, None]
            match_len += matching
        ngram_len = match_len.max(axis=1)
        # The earliest end of a longest match is the earliest occurrence of that n-gram.
        first = np.argmax(match_len == ngram_len[:, None], axis=1)
        start = first + 1
        count = np.minimum(np.minimum(self.k, self.max_model_len - num_tokens), num_tokens - start)
        count = np.where(ngram_len >= self.min_n, np.maximum(count, 0), 0)
        cols = np.arange(self.k)
        valid = cols[None, :] < count[:, None]
        source = np.minimum(start[:, None] + cols[None, :], longest - 1)
        drafts[valid] = np.take_along_axis(tokens, source, axis=1)[valid]
        return drafts, count
