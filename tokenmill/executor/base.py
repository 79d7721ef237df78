"""The executor interface the engine core uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from tokenmill.worker.worker import Worker


class Executor(ABC):
    driver: Worker  # rank 0's worker, in the core's process: its results are the engine's

    @abstractmethod
    def call(self, method: str, *args: Any) -> list[Any]:
        """Start-up work: `method` on every rank's worker; every rank's result, in rank order, once all are
        done (a rank's exception is raised here)."""

    @abstractmethod
    def step(self, method: str, *args: Any) -> Any:
        """A step's call: `method` on every rank's worker; rank 0's result, without waiting for the others
        (their collectives keep them in step)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stops the other ranks' workers and leaves their torch.distributed world."""
