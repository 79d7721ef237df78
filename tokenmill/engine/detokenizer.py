"""Incremental detokenization and stop strings, in the frontend.

Text grows by decoding a short window of ids: the text of ids[prefix:] minus the text of
ids[prefix:read]. A window whose text ends in U+FFFD is an incomplete multi-byte character: nothing
is emitted until the next token completes it.
"""

from __future__ import annotations

from typing import Any

from tokenmill.sampling_params import SamplingParams

_PROMPT_CONTEXT = 4  # prompt ids decoded ahead of the output, so the first word gets its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.output_text = ""
        # Streams hold back the last characters that could still begin a stop string.
        self.stop_buffer = max((len(s) for s in self.stop), default=1) - 1 if not self.include_stop else 0
        self._sent = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, new_token_ids: list[int]) -> str | None:
        """Adds tokens; returns the stop string that matched (and truncates the text), else None."""
        for token_id in new_token_ids:
            self.ids.append(token_id)
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            new_text = self._decode(self.ids[self.prefix_offset:])
            if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
                continue
            delta = new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.output_text += delta
            if self.stop:
                matched = self._find_stop(len(delta))
                if matched is not None:
                    return matched
        return None

    def _find_stop(self, delta_len: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            start = max(0, len(self.output_text) - delta_len - len(stop) + 1)
            index = self.output_text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.output_text = self.output_text[:index + len(stop) if self.include_stop else index]
        return stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """All text so far, or only what was not sent yet; the stop buffer is held back until the end."""
        end = len(self.output_text) if finished else max(self._sent, len(self.output_text) - self.stop_buffer)
        if not delta:
            return self.output_text[:end]
        text = self.output_text[self._sent:end]
        self._sent = end
        return text
