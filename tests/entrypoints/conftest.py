"""A real `tokenmill serve` subprocess on the embedded model, for the OpenAI server tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.distributed.net import free_port

STARTUP_TIMEOUT_S = 300.0
# Short contexts keep the long-prompt tests fast on CPU; 256 MiB of KV is ~5.8k tokens (45 KiB each).
MAX_MODEL_LEN = 512
# float32: these tests compare greedy texts across batchings and cache states, which the CPU's quantized default
# (bfloat16 roundings of its int4 products) may turn into different tokens at a near-tie
SERVER_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(256 << 20), "--max-num-seqs", "64",
               "--disable-uvicorn-access-log", "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
               "--reasoning-parser", "qwen3", "--dtype", "float32"]
# What `make serve` runs: the same without the tool flags, and quantized.
PLAIN_SERVER_ARGS = [a for a in SERVER_ARGS
                     if a not in ("--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--dtype", "float32")]
CUSTOM_CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")


class ServerProcess:
    def __init__(self, log_path: Path, extra_args: list[str] = (), env: dict[str, str] | None = None,
                 base_args: list[str] = SERVER_ARGS) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port",
                   str(self.port), *base_args, *extra_args]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()[-5000:]}")

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """/metrics as sample name -> value (the model_name label dropped; histograms by their _count and _sum)."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        return {sample.name: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if "le" not in sample.labels}

    def wait_idle(self, timeout_s: float = 20.0, headers: dict[str, str] | None = None) -> dict[str, float]:
        """The metrics once nothing runs, waits or holds KV blocks, or as they are after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            values = self.metrics(headers)
            idle = (values["vllm:num_requests_running"] == 0 and values["vllm:num_requests_waiting"] == 0
                    and values["vllm:kv_cache_usage_perc"] == 0)
            if idle or time.monotonic() > deadline:
                return values
            time.sleep(0.2)

    @property
    def core_pid(self) -> int:
        match = re.search(r"engine core process started \(pid (\d+)\)", self.log())
        assert match, "the server did not log its engine core pid"
        return int(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerProcess:
    process = ServerProcess(tmp_path_factory.mktemp("server") / "server.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> ServerProcess:
    """A second server: an API key from the environment and a --chat-template file; test_engine_core_death
    kills its core."""
    directory = tmp_path_factory.mktemp("keyed")
    (directory / "template.jinja").write_text(CUSTOM_CHAT_TEMPLATE)
    process = ServerProcess(directory / "server.log", ["--chat-template", str(directory / "template.jinja")],
                            env={"TOKENMILL_API_KEY": "s3cret"})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory) -> ServerProcess:
    """The server as `make serve` starts it: no tool flags."""
    process = ServerProcess(tmp_path_factory.mktemp("plain") / "server.log", base_args=PLAIN_SERVER_ARGS)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Starts servers with extra flags and environment (`plain`: without the tool flags), each stopped (if
    still running) at the module's end."""
    processes: list[ServerProcess] = []

    def start(extra_args: list[str] = (), env: dict[str, str] | None = None, plain: bool = False) -> ServerProcess:
        processes.append(ServerProcess(tmp_path_factory.mktemp("server") / "server.log", extra_args, env,
                                       PLAIN_SERVER_ARGS if plain else SERVER_ARGS))
        return processes[-1]

    yield start
    for process in processes:
        process.stop()
