"""Opt-in wall-clock breakdown of engine steps (TOKENMILL_STEP_TIMING=1): where a step's time goes.

Phases are host time except `wait`, the time the host blocks on the device for the sampled tokens,
which is the part of the GPU work not hidden behind host work.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

ENABLED = os.environ.get("TOKENMILL_STEP_TIMING") == "1"
_totals: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)


@contextmanager
def phase(name: str) -> Iterator[None]:
    if not ENABLED:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        _totals[name] += time.perf_counter() - started
        _counts[name] += 1


def summary() -> dict[str, dict[str, float]]:
    """Per phase: total seconds, calls and mean milliseconds."""
    return {name: {"seconds": total, "calls": _counts[name], "mean_ms": 1e3 * total / max(_counts[name], 1)}
            for name, total in sorted(_totals.items())}


def reset() -> None:
    _totals.clear()
    _counts.clear()
