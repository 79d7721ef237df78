"""Several ranks on this host: rank 0's worker in the core's process, one spawned process per further rank.

Each call is pickled once and written to every other rank's pipe, then made on rank 0; a step's call does not
wait for the other ranks (their collectives with rank 0 keep them in step), a start-up call collects every
rank's result. A rank that raises reports its error on its pipe and exits; rank 0's next collective then fails
(gloo at once, NCCL at the process group's timeout) and the executor raises the rank's own error. A rank
whose core goes away reads end-of-file and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import weakref
from multiprocessing.connection import Connection
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.distributed.parallel_state import destroy_distributed
from tokenmill.executor.base import Executor
from tokenmill.source import ModelSource
from tokenmill.worker.worker import Worker

logger = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """Another rank's worker raised or died."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, config: EngineConfig, source: ModelSource, init_method: str, conn: Connection) -> None:
    """Entry point of rank `rank`'s process: the worker's calls as they come, until the core goes away."""
    from tokenmill.logger import configure_logging

    configure_logging(prefix=f"Worker[rank {rank}] ")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; the core decides
    # tqdm's default lock is a multiprocessing semaphore, which a process leaving through os._exit leaks
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        worker = Worker(config, source, rank=rank, distributed_init_method=init_method)
        conn.send(("ok", None))
        while True:
            method, args, reply = pickle.loads(conn.recv_bytes())
            if method == "shutdown":
                break
            result = getattr(worker, method)(*args)
            if reply:
                conn.send(("ok", result))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the core is gone
    except BaseException as e:  # noqa: BLE001 - reported to the core, then this rank ends
        logger.exception("rank %d failed", rank)
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        os._exit(1)
    destroy_distributed()
    os._exit(0)


def _stop(conns: list[Connection], procs: list[multiprocessing.Process]) -> None:
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("shutdown", (), False)))
        except OSError:
            pass
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()
    destroy_distributed()


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        world_size = config.parallel.world_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.Process] = []
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)
        for rank in range(1, world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(rank, config, source, init_method, child),
                               name=f"tokenmill-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            self.driver = self._checked(Worker, config, source, rank=0, distributed_init_method=init_method)
            self._results()  # the others' workers are up
        except BaseException:
            self.shutdown()
            raise

    def call(self, method: str, *args: Any) -> list[Any]:
        self._send(method, args, reply=True)
        local = self._checked(getattr(self.driver, method), *args)
        return [local, *self._results()]

    def step(self, method: str, *args: Any) -> Any:
        self._send(method, args, reply=False)
        return self._checked(getattr(self.driver, method), *args)

    def shutdown(self) -> None:
        self._finalizer()

    def _send(self, method: str, args: tuple, reply: bool) -> None:
        payload = pickle.dumps((method, args, reply), protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            try:
                conn.send_bytes(payload)
            except OSError:
                self._raise_rank_failure(wait_s=1.0)
                raise

    def _checked(self, fn, *args: Any, **kwargs: Any) -> Any:
        """fn's result; when it fails, the error of a rank that failed first, if one did (its failure is
        usually what broke rank 0's collective)."""
        try:
            return fn(*args, **kwargs)
        except BaseException:
            self._raise_rank_failure(wait_s=2.0)
            raise

    def _results(self) -> list[Any]:
        results = []
        for rank, conn in enumerate(self.conns, 1):
            try:
                status, value = conn.recv()
            except (EOFError, OSError):
                raise RankFailed(f"rank {rank}'s worker exited (exit code {self.procs[rank - 1].exitcode})") \
                    from None
            if status == "error":
                raise RankFailed(f"rank {rank}'s worker failed: {value}")
            results.append(value)
        return results

    def _raise_rank_failure(self, wait_s: float) -> None:
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), 1):
            try:
                if conn.poll(wait_s):
                    status, value = conn.recv()
                    if status == "error":
                        raise RankFailed(f"rank {rank}'s worker failed: {value}")
            except (EOFError, OSError):
                pass
            proc.join(timeout=0.1 if proc.exitcode is None else 0)
            if proc.exitcode is not None:
                raise RankFailed(f"rank {rank}'s worker exited (exit code {proc.exitcode})")
