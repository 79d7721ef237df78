"""One rank: the worker lives in the core's process and every call is a plain method call."""

from __future__ import annotations

from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.executor.base import Executor
from tokenmill.source import ModelSource
from tokenmill.worker.worker import Worker


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.driver = Worker(config, source)

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.driver, method)(*args)]

    def step(self, method: str, *args: Any) -> Any:
        return getattr(self.driver, method)(*args)

    def shutdown(self) -> None:
        """One rank: nothing else runs."""
