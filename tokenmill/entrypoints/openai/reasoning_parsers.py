"""Reasoning parsers (`--reasoning-parser`): the model's thinking goes to `reasoning_content`, the answer
to `content`, for whole texts and for streams.

    deepseek_r1   "...thinking...</think>answer"  (the chat template already opened <think>)
    qwen3         "<think>...thinking...</think>answer", or no <think> at all: everything is the answer
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass
class ReasoningParser:
    implicit_start: bool  # text before </think> is reasoning even without <think>

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole text; None where a part is absent."""
        body = text
        started = self.implicit_start
        if body.lstrip().startswith(START):
            body = body.lstrip()[len(START):]
            started = True
        if not started:
            return None, text
        if END not in body:
            return body, None
        reasoning, content = body.split(END, 1)
        return reasoning, content.lstrip("\n") or None

    def thinking_open(self, prompt: str) -> bool:
        """Does the model start by thinking? Always with an implicit start; else only if the prompt ends
        inside an unclosed <think> (a template that opened it for the model)."""
        return self.implicit_start or prompt.rfind(START) > prompt.rfind(END)

    def extract_delta(self, previous_text: str, current_text: str) -> tuple[str | None, str | None]:
        """The (reasoning, content) pieces new in `current_text`. A tag that is only partly generated is
        held back, so no fragment of it ever reaches either part."""
        before, now = self.extract(_stable(previous_text)), self.extract(_stable(current_text))
        return _suffix(before[0], now[0]), _suffix(before[1], now[1])


def _stable(text: str) -> str:
    """`text` without a trailing proper prefix of a tag (e.g. "</thi")."""
    for tag in (END, START):
        for cut in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:cut]):
                return text[:-cut]
    return text


def _suffix(before: str | None, now: str | None) -> str | None:
    if not now:
        return None
    before = before or ""
    return now[len(before):] if now.startswith(before) and len(now) > len(before) else None


REASONING_PARSERS = {"deepseek_r1": ReasoningParser(implicit_start=True),
                     "qwen3": ReasoningParser(implicit_start=False)}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {sorted(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]
