"""The OpenAI server over a tensor-parallel engine (the embedded model split three ways on the CPU): it answers
as one rank does, and a rank that dies ends every request in flight with an error, turns /health to 503 and
stops the server."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

MODEL = "SmolLM2-135M-Instruct"


def test_tp3_server_answers_as_one_rank_and_a_dead_rank_fails_it(server, start_server):
    split = start_server(["--tensor-parallel-size", "3"])
    clients = [openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
               for s in (server, split)]
    answers = [c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
               .choices[0].text for c in clients]
    assert answers[1] == answers[0] and answers[0]

    ranks = psutil.Process(split.core_pid).children()
    ranks = [p for p in ranks if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(ranks) == 2  # ranks 1 and 2; rank 0 is the core's own
    failures: list[Exception] = []

    def long_request() -> None:
        try:
            clients[1].completions.create(model=MODEL, prompt="Tell me a story.", max_tokens=400,
                                          extra_body={"ignore_eos": True})
        except openai.APIError as e:
            failures.append(e)

    thread = threading.Thread(target=long_request)
    thread.start()
    stream = clients[1].completions.create(model=MODEL, prompt="Write a poem.", max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    time.sleep(0.5)
    os.kill(ranks[0].pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="rank .*'s worker exited"):
        for _ in chunks:
            pass
    thread.join(60)
    assert len(failures) == 1 and "worker exited" in str(failures[0])
    assert httpx.get(f"{split.url}/health").status_code == 503
    assert split.proc.wait(timeout=30) == 1
