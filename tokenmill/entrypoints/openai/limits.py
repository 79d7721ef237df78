"""The caps on one request that `tokenmill serve` takes as flags; apart from protocol.py (pydantic), so that
building the CLI's parsers stays fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestLimits:
    """Caps on one request, beyond type checks; each is a `tokenmill serve` flag of the same name."""

    max_request_body_bytes: int = 16 << 20  # larger bodies are 413s (api_server.BodySizeLimitMiddleware)
    max_n: int = 128  # OpenAI's limit; n engine requests are created per prompt
    max_stop_strings: int = 256  # entries of `stop`, and of `stop_token_ids`
    # characters in one stop string: each is searched for after every token, and a stream holds back its
    # length minus one, so a megabyte-long stop string would stall the stream and load the event loop
    max_stop_string_length: int = 1024
    max_json_depth: int = 64  # nesting of FREE_FORM_FIELDS

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_n", "max_stop_strings", "max_stop_string_length",
                     "max_json_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
