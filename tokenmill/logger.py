"""tokenmill's log lines: INFO and above of every `tokenmill.*` logger go to stderr in one format, as vLLM shows
its own, so start-up phases and their durations are seen whether tokenmill runs as the CLI or as a library.
TOKENMILL_CONFIGURE_LOGGING=0 leaves them to the application's logging configuration instead."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(levelname)s %(asctime)s {prefix}%(name)s: %(message)s"


def configure_logging(prefix: str = "") -> None:
    """Sets the `tokenmill` logger's one handler (made on the first call); `prefix` goes before each logger
    name (the engine core's process marks its lines so)."""
    if os.environ.get("TOKENMILL_CONFIGURE_LOGGING", "1") == "0":
        return
    logger = logging.getLogger("tokenmill")
    handler = next((h for h in logger.handlers if getattr(h, "tokenmill", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.tokenmill = True
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(FORMAT.format(prefix=prefix)))
    logger.setLevel(logging.INFO)
    logger.propagate = False
