"""Executors: how the engine core drives the workers of its ranks.

The core makes each Worker call through an executor, which makes it on every rank:

    uni     one rank, the worker in this process (world size 1)
    mp      one process per further rank on this host; rank 0's worker stays in the core's process
    ray     Ray actors for the further ranks, placed by a placement group, for more than one machine

Every rank gets the same calls in the same order (the scheduler's output included), so their collectives
meet; only rank 0's results return to the core.
"""

from __future__ import annotations

from tokenmill.config import EngineConfig
from tokenmill.executor.base import Executor
from tokenmill.source import ModelSource

__all__ = ["Executor", "make_executor"]


def make_executor(config: EngineConfig, source: ModelSource) -> Executor:
    backend = config.parallel.executor_backend()
    if backend == "uni":
        from tokenmill.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config, source)
    if backend == "ray":
        from tokenmill.executor.ray_executor import RayExecutor

        return RayExecutor(config, source)
    from tokenmill.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config, source)
