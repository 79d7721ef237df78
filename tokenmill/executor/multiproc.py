"""Several ranks on this host: rank 0's worker in the core's process, one child process per further rank,
joined to the core by a socket pair (a multiprocessing Connection on each end).

Each call is pickled once and written to every other rank's connection, then made on rank 0; a step's call does not
wait for the other ranks (their collectives with rank 0 keep them in step), a start-up call collects every
rank's result. A rank that raises reports its error on its connection and exits; rank 0's next collective then
fails (gloo at once, NCCL at the process group's timeout) and the executor raises the rank's own error. A rank
whose core goes away reads end-of-file and exits.

In a pipeline rank 0 is the first stage, and a step's output comes from the last stage's first rank (the output
rank): step_with_output() asks that rank alone for its result, and next_output() reads the results in order,
so that several micro-batches can be in flight.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.distributed.net import free_port
from tokenmill.distributed.parallel_state import destroy_distributed
from tokenmill.executor.base import Executor
from tokenmill.source import ModelSource
from tokenmill.worker.worker import Worker

logger = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """Another rank's worker raised or died."""


def _worker_main() -> None:
    """Entry point of a further rank's process (started by MultiprocExecutor): connects back to the core, then
    makes the worker's calls as they come until the core goes away (its connection reads end-of-file however
    the core ends)."""
    from tokenmill.logger import configure_logging

    conn = Connection(int(sys.argv[1]))
    rank, config, source, init_method = pickle.loads(conn.recv_bytes())
    configure_logging(prefix=f"Worker[rank {rank}] ")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; the core decides
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
    except (EOFError, OSError, KeyboardInterrupt):
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


def _stop(conns: list[Connection], procs: list[subprocess.Popen]) -> None:
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("shutdown", (), False)))
        except OSError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for conn in conns:
        conn.close()
    destroy_distributed()


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        world_size = config.parallel.world_size
        parallel = config.parallel
        self.output_rank = (parallel.pipeline_parallel_size - 1) * parallel.tensor_parallel_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.conns: list[Connection] = []
        self.procs: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)
        for rank in range(1, world_size):
            # A plain child process (the server's core is a daemon, which multiprocessing forbids children),
            # joined to the core by a socket pair: private, and closed by either side's death.
            ours, theirs = socket.socketpair()
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", "from tokenmill.executor.multiproc import _worker_main; _worker_main()",
                 str(theirs.fileno())], pass_fds=(theirs.fileno(),)))
            theirs.close()
            conn = Connection(ours.detach())
            conn.send_bytes(pickle.dumps((rank, config, source, init_method)))
            self.conns.append(conn)
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

    def step_with_output(self, method: str, *args: Any) -> None:
        """A step's call whose result is the output rank's, read later by next_output()."""
        self._send(method, args, reply=False, reply_rank=self.output_rank)
        self._checked(getattr(self.driver, method), *args)

    def next_output(self) -> Any:
        """The output rank's result of the oldest step_with_output() call not yet read."""
        return self._results([self.output_rank])[0]

    def shutdown(self) -> None:
        self._finalizer()

    def _send(self, method: str, args: tuple, reply: bool, reply_rank: int | None = None) -> None:
        payloads = {flag: pickle.dumps((method, args, flag), protocol=pickle.HIGHEST_PROTOCOL)
                    for flag in {reply, reply_rank is not None}}
        for rank, conn in enumerate(self.conns, 1):
            try:
                conn.send_bytes(payloads[reply or rank == reply_rank])
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

    def _results(self, ranks: list[int] | None = None) -> list[Any]:
        """The results of every other rank, or of `ranks`, in rank order."""
        results = []
        for rank in ranks or range(1, len(self.conns) + 1):
            conn = self.conns[rank - 1]
            try:
                status, value = conn.recv()
            except (EOFError, OSError):
                raise RankFailed(f"rank {rank}'s worker exited (exit code {self.procs[rank - 1].wait()})") from None
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
            try:
                code = proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            raise RankFailed(f"rank {rank}'s worker exited (exit code {code})")
