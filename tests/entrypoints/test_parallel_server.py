"""The OpenAI server over a tensor-parallel engine (the embedded model split three ways on the CPU): it answers
as one rank does, and a rank that dies ends every request in flight with an error, turns /health to 503 and
stops the server. And over two data-parallel engine cores: a load spread over both, every request answered;
and two cores sharing a MoE model's experts (expert parallelism over the cores), answering as one core does."""

from __future__ import annotations

import asyncio
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


def test_dp2_server_spreads_a_load_over_both_cores_and_answers_each_request_once(start_server):
    """Two engine cores behind one server: 64 concurrent requests, each answered once, greedy answers equal to
    the same prompt's answer alone, and both cores busy (each core process's CPU time grows)."""
    split = start_server(["--data-parallel-size", "2"])
    cores = [p for p in psutil.Process(split.proc.pid).children() if "_core_main" in " ".join(p.cmdline())]
    assert len(cores) == 2
    before = [sum(core.cpu_times()[:2]) for core in cores]
    client = openai.AsyncOpenAI(base_url=f"{split.url}/v1", api_key="unused", max_retries=0, timeout=300)
    prompts = [f"Item {i}: the colour of the sky is" for i in range(64)]

    async def load() -> list:
        async def one(prompt: str):
            return await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)

        return await asyncio.gather(*(one(p) for p in prompts))

    responses = asyncio.run(load())
    assert len({r.id for r in responses}) == 64 and all(len(r.choices) == 1 and r.choices[0].text for r in responses)
    used = [sum(core.cpu_times()[:2]) - b for core, b in zip(cores, before)]
    assert min(used) > 0.2, f"CPU seconds per core during the load: {used}"
    alone = openai.OpenAI(base_url=f"{split.url}/v1", api_key="unused", max_retries=0, timeout=120)
    for i in (0, 37):
        again = alone.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0)
        assert again.choices[0].text == responses[i].choices[0].text


def test_dp2_expert_parallel_server_answers_as_one_core_and_stops_on_ctrl_c(start_server, tiny_model_dir):
    """`serve -dp 2 --enable-expert-parallel` on a MoE model: two cores sharing its experts, stepping together;
    16 concurrent greedy requests get the same texts as one core gives, and Ctrl-C stops both cores and the
    server cleanly."""
    path = tiny_model_dir("qwen3_moe")
    one, spread = (start_server([path, *args], plain=True) for args in ([], ["-dp", "2", "--enable-expert-parallel"]))
    prompts = [f"Item {i}: the colour of the sky is" for i in range(16)]

    def answers(server) -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]

        async def load() -> list[str]:
            responses = await asyncio.gather(*(client.completions.create(model=model, prompt=p, max_tokens=8,
                                                                         temperature=0) for p in prompts))
            return [r.choices[0].text for r in responses]

        return asyncio.run(load())

    assert answers(spread) == answers(one)
    cores = [p for p in psutil.Process(spread.proc.pid).children() if "_core_main" in " ".join(p.cmdline())]
    assert len(cores) == 2
    spread.proc.send_signal(signal.SIGINT)
    assert spread.proc.wait(timeout=60) == 0
    psutil.wait_procs(cores, timeout=10)
    assert not any(core.is_running() for core in cores)
