"""The engine core in its own process, and the frontend's handle on it.

    frontend process                                 engine core process (a fresh interpreter)
    ----------------                                 ---------------------------
    EngineCoreClient.add_request ----+
    EngineCoreClient.abort_requests -+-- input pipe --> drain messages (block only while idle)
    EngineCoreClient.call_utility ---+                  step(): schedule -> execute -> update
                                                        |
    reader thread <------------------- output pipe ----+  one CoreOutputs per step (+ SchedulerStats)
      -> on_message(...) in the event loop                 UtilityResult per utility call

Messages are plain dataclasses pickled by multiprocessing.Connection over socket pairs: no extra
dependencies, and a step's message is small (a few token ids per request). The reader thread waits on the
output socket and on the process sentinel together, so a core that dies -- crash, OOM kill, SIGKILL -- is
noticed at once and reported as CoreDead, never as a hang.

The core is `python -c ...` started by subprocess, not a multiprocessing child: it imports only what it runs
(not the parent's __main__ again, as spawn does, nor a resource tracker: 0.3 s of a CLI start on two cores),
and it may start processes of its own (further tensor-parallel ranks), which a daemonic multiprocessing
child may not.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.core.interface import EngineCoreOutput, EngineCoreRequest, SchedulerStats
from tokenmill.logger import configure_logging
from tokenmill.source import resolve_model

logger = logging.getLogger(__name__)

STARTUP_POLL_S = 0.5
SHUTDOWN_TIMEOUT_S = 5.0
# Idle cores in lock-step (expert parallelism over data-parallel cores) agree this often whether any has work:
# a new request waits at most this long for the other cores; idle, each makes 100 small gloo all-reduces a second.
LOCKSTEP_IDLE_POLL_S = 0.01


# ---- frontend -> core ------------------------------------------------------------------------------

@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class UtilityCall:
    call_id: int
    method: str  # "stats" | "reset_prefix_cache"


@dataclass
class Shutdown:
    pass


# ---- core -> frontend ------------------------------------------------------------------------------

@dataclass
class CoreReady:
    pid: int
    max_model_len: int
    num_blocks: int
    block_size: int


@dataclass
class CoreOutputs:
    outputs: list[EngineCoreOutput]  # one step's outputs; empty for a stats-only update
    stats: SchedulerStats


@dataclass
class UtilityResult:
    call_id: int
    result: Any = None
    error: str | None = None


@dataclass
class CoreFailed:
    """The core raised: sent once, right before its process exits non-zero."""

    message: str


@dataclass
class CoreDead:
    """Not sent by the core: the reader thread's report that the process is gone."""

    message: str


CoreMessage = CoreOutputs | UtilityResult | CoreDead


class EngineDeadError(RuntimeError):
    """The engine core process is gone; nothing in flight will finish."""


# ---- the core process ------------------------------------------------------------------------------

class EngineCoreProc:
    """The loop run in the core process: drain messages, step, send outputs."""

    def __init__(self, core: Any, input_conn: Connection, output_conn: Connection) -> None:
        self.core = core
        self.input = input_conn
        self.output = output_conn

    def run(self) -> None:
        if self.core.lockstep:
            return self._run_lockstep()
        while True:
            num_handled = 0
            if not self.core.has_unfinished_requests():
                if not self._handle(self.input.recv()):  # idle: block until there is something to do
                    return
                num_handled += 1
            while self.input.poll(0):
                if not self._handle(self.input.recv()):
                    return
                num_handled += 1
            if self.core.has_unfinished_requests():
                outputs = self.core.step()
                self.output.send(CoreOutputs(outputs, self.core.stats()))
            elif num_handled:
                # Aborts that emptied the engine change the stats without a step: report them.
                self.output.send(CoreOutputs([], self.core.stats()))

    def _run_lockstep(self) -> None:
        """The loop of a core whose experts other data-parallel cores share: each turn, the cores agree whether
        any has work (and whether any is stopping); if one has, every core runs a step, a made-up one where
        it has nothing to run, so their MoE layers exchange tokens together. While none has work each waits
        for a message at most LOCKSTEP_IDLE_POLL_S between agreements; a shutdown stops them all together."""
        stopping, any_work = False, False
        while True:
            num_handled = 0
            if not any_work and not stopping and not self.core.has_unfinished_requests():
                self.input.poll(LOCKSTEP_IDLE_POLL_S)  # every core idle: wait a little for a message
            while not stopping and self.input.poll(0):
                stopping = not self._handle(self.input.recv())
                num_handled += 1
            has_work = self.core.has_unfinished_requests()
            any_work, any_stopping = self.core.dp_sync(has_work, stopping)
            if any_stopping:
                return
            if has_work:
                outputs = self.core.step()
                self.output.send(CoreOutputs(outputs, self.core.stats()))
            else:
                if any_work:
                    self.core.dummy_step()
                if num_handled:  # aborts that emptied the engine change the stats without a step
                    self.output.send(CoreOutputs([], self.core.stats()))

    def _handle(self, message: Any) -> bool:
        """Applies one message; False means shut down."""
        if isinstance(message, EngineCoreRequest):
            try:
                self.core.add_request(message)
            except ValueError as e:  # the frontend validates first; this only guards the core
                logger.error("rejected request %s: %s", message.request_id, e)
                self.output.send(CoreOutputs([EngineCoreOutput(message.request_id, [], finish_reason="abort")],
                                             self.core.stats()))
        elif isinstance(message, AbortRequests):
            self.core.abort_requests(message.request_ids)
        elif isinstance(message, UtilityCall):
            self.output.send(self._utility(message))
        elif isinstance(message, Shutdown):
            return False
        else:
            raise TypeError(f"unknown message {type(message).__name__}")
        return True

    def _utility(self, call: UtilityCall) -> UtilityResult:
        if call.method == "stats":
            return UtilityResult(call.call_id, self.core.stats())
        if call.method == "reset_prefix_cache":
            return UtilityResult(call.call_id, self.core.reset_prefix_cache())
        return UtilityResult(call.call_id, error=f"unknown utility method {call.method!r}")


def run_engine_core(config: EngineConfig, input_conn: Connection, output_conn: Connection) -> None:
    """The core process's life: it finds the model itself (while the frontend does the same), builds the
    engine core and serves the frontend's messages."""
    logging.basicConfig(level=logging.INFO,
                        format=f"%(levelname)s %(asctime)s EngineCore[{os.getpid()}] %(name)s: %(message)s")
    configure_logging(prefix=f"EngineCore[{os.getpid()}] ")
    # Ctrl-C reaches the whole process group; the frontend decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # tqdm's default lock is a multiprocessing semaphore, which this process leaks when it exits through
    # os._exit (the resource tracker then warns); one process needs only a thread lock.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    core = None
    try:
        from tokenmill.engine.core import EngineCore

        core = EngineCore(config, resolve_model(config.model.model, config.model.revision))
        output_conn.send(CoreReady(os.getpid(), core.config.scheduler.max_model_len, core.num_blocks,
                                   config.cache.block_size))
        EngineCoreProc(core, input_conn, output_conn).run()
    except (EOFError, BrokenPipeError):
        pass  # the frontend is gone: nothing left to serve
    except BaseException as e:  # noqa: BLE001 - report anything, then die loudly
        if core is None and isinstance(e, (ValueError, OSError)):
            # A start-up the user can fix (a model that is not there, a KV cache too small): the message is
            # the whole story, so no traceback.
            logger.error("engine core failed to start: %s", e)
            report = f"{type(e).__name__}: {e}"
        else:
            logger.exception("engine core failed")
            report = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        try:
            output_conn.send(CoreFailed(report))
        except Exception:  # noqa: BLE001
            pass
        os._exit(1)
    if core is not None:
        core.shutdown()
    # The frontend waits for this process to end: skip the interpreter's teardown (a tenth of a second of
    # unloading torch) once the logs are out.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _core_main() -> None:
    """Entry point of the core's interpreter: argv[1] and argv[2] are its sockets to the frontend (input,
    output); the first input message is the engine's config."""
    input_conn, output_conn = Connection(int(sys.argv[1])), Connection(int(sys.argv[2]))
    run_engine_core(pickle.loads(input_conn.recv_bytes()), input_conn, output_conn)


class CoreProcess:
    """The core's process, with the part of multiprocessing.Process's interface the client uses. `sentinel`
    becomes readable when the process ends: the read end of a pipe whose write end only the process holds."""

    def __init__(self, conns: tuple[socket.socket, socket.socket]) -> None:
        sentinel_read, sentinel_write = os.pipe()
        fds = (*(sock.fileno() for sock in conns), sentinel_write)
        self.popen = subprocess.Popen(
            [sys.executable, "-c", "from tokenmill.engine.core_client import _core_main; _core_main()",
             *(str(fd) for fd in fds[:2])], pass_fds=fds)
        os.close(sentinel_write)
        self.sentinel = sentinel_read
        self.pid = self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()

    def close(self) -> None:
        os.close(self.sentinel)


# ---- the frontend's client -------------------------------------------------------------------------

class EngineCoreClient:
    """Starts the core process and moves messages to and from it.

    `on_message` is called from the reader thread with CoreOutputs, UtilityResult, and finally
    CoreDead if the process goes away without being asked to.
    """

    def __init__(self, config: EngineConfig) -> None:
        """Spawns the core at once: it finds the model itself, so that it starts before the frontend has."""
        input_ours, input_theirs = socket.socketpair()
        output_ours, output_theirs = socket.socketpair()
        self.process = CoreProcess((input_theirs, output_theirs))
        # Only the child holds these ends now, so its death closes them and our reads see EOF.
        input_theirs.close()
        output_theirs.close()
        self._input_send = Connection(input_ours.detach())
        self._output_recv = Connection(output_ours.detach())
        self._input_send.send_bytes(pickle.dumps(config))
        self._closing = False
        self.ready: CoreReady | None = None
        # Sends go through a writer thread: a full pipe (the core is mid-step) never blocks the event loop.
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="EngineCoreInputWriter", daemon=True)
        self._writer.start()
        self._reader: threading.Thread | None = None
        logger.info("engine core process started (pid %d)", self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float | None = None) -> CoreReady:
        """Blocks until the core has loaded the model; raises if it failed or died first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            ready = wait([self._output_recv, self.process.sentinel], STARTUP_POLL_S)
            if self._output_recv in ready:
                try:
                    message = self._output_recv.recv()
                except EOFError:
                    message = None
                if isinstance(message, CoreReady):
                    self.ready = message
                    return message
                if isinstance(message, CoreFailed):
                    self.process.join(SHUTDOWN_TIMEOUT_S)
                    raise EngineDeadError(f"engine core failed to start: {message.message}")
            if self.process.sentinel in ready or not self.process.is_alive():
                self.process.join(SHUTDOWN_TIMEOUT_S)
                raise EngineDeadError(f"engine core process exited during startup (exit code "
                                      f"{self.process.exitcode})")
        raise TimeoutError(f"engine core not ready after {timeout_s} s")

    def start_reader(self, on_message: Callable[[CoreMessage], None]) -> None:
        self._reader = threading.Thread(target=self._read_loop, args=(on_message,), name="EngineCoreOutputReader",
                                        daemon=True)
        self._reader.start()

    def _read_loop(self, on_message: Callable[[CoreMessage], None]) -> None:
        while True:
            ready = wait([self._output_recv, self.process.sentinel])
            if self._output_recv in ready:
                try:
                    message = self._output_recv.recv()
                except (EOFError, OSError):
                    message = None
                if isinstance(message, (CoreOutputs, UtilityResult)):
                    on_message(message)
                    continue
                detail = message.message if isinstance(message, CoreFailed) else None
            else:
                detail = None
            if self._closing:
                return
            self.process.join(SHUTDOWN_TIMEOUT_S)
            reason = detail or f"exit code {self.process.exitcode}"
            on_message(CoreDead(f"the engine core process died unexpectedly ({reason.splitlines()[0]})"))
            return

    def _write_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._input_send.send(message)
            except (BrokenPipeError, OSError):
                return  # the core is gone; the reader thread reports it

    def _send(self, message: Any) -> None:
        if self._closing:
            raise EngineDeadError("the engine core client is shut down")
        self._outbox.put(message)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(AbortRequests(list(request_ids)))

    def call_utility(self, call_id: int, method: str) -> None:
        self._send(UtilityCall(call_id, method))

    def shutdown(self) -> None:
        """Asks the core to stop, then makes sure it has: terminate, then kill."""
        if self._closing:
            return
        self._closing = True
        self._outbox.put(Shutdown())
        self._outbox.put(None)
        self.process.join(SHUTDOWN_TIMEOUT_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(SHUTDOWN_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        # The process is gone, so both threads are about to return; close the pipes after them.
        for thread in (self._writer, self._reader):
            if thread is not None and thread is not threading.current_thread():
                thread.join(SHUTDOWN_TIMEOUT_S)
        for conn in (self._input_send, self._output_recv):
            conn.close()
        self.process.close()
