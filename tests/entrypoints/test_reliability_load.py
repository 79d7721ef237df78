"""Reliability under load: many concurrent streaming clients, a KV pool too small for them (preemption),
clients that hang up at every stage, and an engine core killed mid-load. Real `tokenmill serve` processes on
the embedded model (conftest.py): an unpressured one for the load (load_rounds), and `pressured_server`, whose
core the last test kills.

Greedy outputs are the oracle: a request's text must not depend on what else the server was doing. Each test
records its numbers (record_reliability) before asserting on them, for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
NUM_CLIENTS = 64  # concurrent streaming clients, one request each per round
CLIENT_TIMEOUT_S = 600.0  # a request still unanswered after this long is lost (hung)
WORDS = ("river stone lantern garden copper window orchard signal harbor meadow thunder velvet compass ember "
         "glacier puzzle").split()
STOP_STRINGS = ("e", ",", [".", "\n"], " the")
# The frontend's and the engine core's resident memory together, after a third identical round, may exceed
# what they held after the second by at most this much (the first lets caches settle: between the first and the
# second the engine core grew by up to 35 MiB on this machine on 2026-12-07, at the commit before and after the
# session's changes alike). Measured on this project's 2-core machine: +0.1 MiB
# when it was quiet, +0.2, +5.0 and +15.1 MiB while other jobs shared it (allocator, torch and tokenizer
# caches settling); 32 MiB is ~2 % of the ~1.7 GiB the two processes hold. It fails a leak of more than
# ~0.5 MiB a request (64 a round: a request's tensors, say);
# a leak of a few KiB a request (its token lists) needs more rounds than CI can afford.
MAX_RSS_GROWTH_BYTES = 32 << 20
# The pressured server: a KV pool of 16 blocks of 16 tokens (45 KiB a token) holds 256 tokens, two requests
# at --max-model-len 128, three or four of this load's; eight running sequences must preempt.
PRESSURED_ARGS = ["--max-model-len", "128", "--kv-cache-memory-bytes", str(16 * 16 * 46080), "--max-num-seqs", "8"]
MAX_NUM_SEQS = 8
# What a dropped request would generate (ignore_eos) if it were not aborted; its chat prompt is 40 tokens,
# so it fits in the pressured server's 128.
DROP_MAX_TOKENS = 80
IDLE_TIMEOUT_S = 20.0
IDLE_CPU_WINDOW_S = 2.0
NUM_PRESSURED_JOBS = 32  # the load's first half (n = 2, stop strings and chats among them): ~3 run at once


@dataclass(frozen=True)
class Job:
    """One streamed, greedy request of the load."""

    chat: bool
    prompt: str
    max_tokens: int
    n: int = 1
    stop: str | list[str] | None = None


@dataclass
class Outcome:
    texts: list[str]  # per choice
    finish_reasons: list[list[str]]  # per choice: every finish_reason streamed for it
    num_tokens: int | None = None  # usage.completion_tokens
    error: str | None = None
    error_status: int | None = None  # the HTTP status, or the code of an error event in the stream


def make_jobs(num_jobs: int) -> list[Job]:
    """Prompts of 3 to 42 words, 4 to 16 new tokens, a third of them chats, every eighth with n = 2; every
    fourth job repeats the one before with a stop string, so its text is that job's text cut at the stop."""
    jobs: list[Job] = []
    for i in range(num_jobs):
        if i % 4 == 3:
            jobs.append(Job(jobs[-1].chat, jobs[-1].prompt, jobs[-1].max_tokens, stop=STOP_STRINGS[i // 4 % 4]))
            continue
        words = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i * 13 % 40))
        jobs.append(Job(chat=i % 3 == 1, prompt=f"Story {i}: {words}", max_tokens=4 + i * 5 % 13,
                        n=2 if i % 8 == 5 else 1))
    return jobs


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)


async def run_job(client: openai.AsyncOpenAI, job: Job) -> Outcome:
    """Streams one job to its end; an exception becomes the outcome's error."""
    kwargs = dict(model=MODEL, max_tokens=job.max_tokens, temperature=0.0, n=job.n, stop=job.stop, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    outcome = Outcome([""] * job.n, [[] for _ in range(job.n)])
    try:
        if job.chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": job.prompt}],
                                                          **kwargs)
        else:
            stream = await client.completions.create(prompt=job.prompt, **kwargs)
        async for chunk in stream:
            if chunk.usage:
                outcome.num_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if job.chat:
                    reasoning = (choice.delta.model_extra or {}).get("reasoning_content") or ""
                    outcome.texts[choice.index] += reasoning + (choice.delta.content or "")
                else:
                    outcome.texts[choice.index] += choice.text
                if choice.finish_reason:
                    outcome.finish_reasons[choice.index].append(choice.finish_reason)
    except openai.APIStatusError as e:
        outcome.error, outcome.error_status = f"{type(e).__name__}: {e}", e.status_code
    except openai.APIError as e:  # an error event in the stream
        outcome.error = f"{type(e).__name__}: {e}"
        outcome.error_status = e.body.get("code") if isinstance(e.body, dict) else None
    except Exception as e:  # noqa: BLE001 - a dropped connection, a timeout: counted, not raised
        outcome.error = f"{type(e).__name__}: {e}"
    return outcome


async def run_jobs(url: str, jobs: list[Job]) -> list[Outcome]:
    """Every job at once, each from its own task."""
    async with openai_client(url) as client:
        return await asyncio.gather(*(run_job(client, job) for job in jobs))


def check_outcomes(jobs: list[Job], outcomes: list[Outcome]) -> dict[int, str]:
    """job index -> what is wrong with it: an error, a wrong token count or finish reason, or a stop-string
    text that is not its twin's text cut at the stop (the twin is the job before: the same request without
    a stop string)."""
    problems = {}
    for i, (job, outcome) in enumerate(zip(jobs, outcomes)):
        if outcome.error:
            problems[i] = outcome.error
        elif job.stop is None:
            if (outcome.num_tokens, outcome.finish_reasons) != (job.n * job.max_tokens, [["length"]] * job.n):
                problems[i] = (f"{outcome.num_tokens} tokens, finish reasons {outcome.finish_reasons}; expected "
                               f"{job.n * job.max_tokens} tokens, each choice finishing once for length")
        else:
            full = outcomes[i - 1].texts[0]
            cut = min((full.index(s) for s in ([job.stop] if isinstance(job.stop, str) else job.stop) if s in full),
                      default=None)
            expected = ([full[:cut]], [["stop"]]) if cut is not None else ([full], [["length"]])
            counted = outcome.num_tokens is not None and outcome.num_tokens <= job.max_tokens
            if (outcome.texts, outcome.finish_reasons) != expected or not counted:
                problems[i] = (f"stop {job.stop!r} gave {outcome.texts!r} {outcome.finish_reasons} in "
                               f"{outcome.num_tokens} tokens; expected {expected}")
    return problems


def differences(outcomes: list[Outcome], reference: list[Outcome]) -> dict[int, str]:
    """job index -> how its texts differ from the reference's (greedy: they must be equal)."""
    return {i: f"{got.texts!r} instead of {want.texts!r}" for i, (got, want) in enumerate(zip(outcomes, reference))
            if not got.error and got.texts != want.texts}


def num_server_errors(outcomes: list[Outcome]) -> int:
    return sum(o.error_status is not None and o.error_status >= 500 for o in outcomes)


def describe(problems: dict[int, str]) -> str:
    return "\n".join(f"job {i}: {problem}" for i, problem in sorted(problems.items())[:20])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_idle(values: dict[str, float]) -> None:
    assert (values["vllm:num_requests_running"], values["vllm:num_requests_waiting"],
            values["vllm:kv_cache_usage_perc"]) == (0, 0, 0), values


async def wait_for_metrics(server, condition, timeout_s: float = 120.0) -> dict[str, float]:
    """Polls /metrics (off the event loop, so the clients keep streaming) until condition(values) holds."""
    deadline = time.monotonic() + timeout_s
    while not condition(values := await asyncio.to_thread(server.metrics)):
        assert time.monotonic() < deadline, f"metrics never reached the condition: {values}"
        await asyncio.sleep(0.05)
    return values


# ---- load ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def load_rounds(start_server) -> dict:
    """Three identical rounds of NUM_CLIENTS concurrent streaming clients against an unpressured server, with
    the metrics and the resident memory of both server processes after each, then the CPU time they use
    in IDLE_CPU_WINDOW_S of idling. The first round's texts are the reference for the pressured server.
    The server is stopped here, so that it does not compete for the CPU with the pressured one."""
    server = start_server()
    jobs = make_jobs(NUM_CLIENTS)
    pids = (server.proc.pid, server.core_pid)
    rounds = []
    for _ in range(3):  # the third measures memory against the second, after the caches of the first settled
        started = time.monotonic()
        outcomes = asyncio.run(run_jobs(server.url, jobs))
        seconds = time.monotonic() - started
        rounds.append({"outcomes": outcomes, "seconds": seconds, "metrics": server.wait_idle(IDLE_TIMEOUT_S),
                       "rss": [rss_bytes(pid) for pid in pids]})
    before = [cpu_seconds(pid) for pid in pids]
    time.sleep(IDLE_CPU_WINDOW_S)
    idle_cpu_s = [cpu_seconds(pid) - seconds for pid, seconds in zip(pids, before)]
    server.stop()
    return {"jobs": jobs, "rounds": rounds, "idle_cpu_s": idle_cpu_s}


def test_load_every_request_completes_and_memory_stays_flat(load_rounds, record_reliability):
    jobs, (first, second, third) = load_rounds["jobs"], load_rounds["rounds"]
    problems = [check_outcomes(jobs, first["outcomes"]),
                {**check_outcomes(jobs, second["outcomes"]), **differences(second["outcomes"], first["outcomes"])},
                {**check_outcomes(jobs, third["outcomes"]), **differences(third["outcomes"], first["outcomes"])}]
    growth = [after - before for before, after in zip(second["rss"], third["rss"])]
    record_reliability(
        "load: 64 concurrent streaming clients, three identical rounds", clients=NUM_CLIENTS, requests=3 * len(jobs),
        lost_requests=sum(map(len, problems)),
        server_errors=sum(num_server_errors(r["outcomes"]) for r in (first, second, third)),
        kv_leaked=max(r["metrics"]["vllm:kv_cache_usage_perc"] for r in (first, second, third)),
        detail=f"{sum(job.n for job in jobs)} sequences a round, n = 2 and stop strings among them; rounds of "
               f"{first['seconds']:.0f}, {second['seconds']:.0f} and {third['seconds']:.0f} s; RSS of the server and "
               f"its engine core "
               f"{second['rss'][0] / 2**20:.0f} + {second['rss'][1] / 2**20:.0f} MiB after round 2, "
               f"{growth[0] / 2**20:+.1f} and {growth[1] / 2**20:+.1f} MiB after round 3 (bound: "
               f"+{MAX_RSS_GROWTH_BYTES / 2**20:.0f} MiB together)")
    for number, round_problems in enumerate(problems, 1):
        assert not round_problems, f"round {number}:\n{describe(round_problems)}"
    for r in (first, second, third):
        assert_idle(r["metrics"])
    assert sum(growth) <= MAX_RSS_GROWTH_BYTES, f"RSS grew by {sum(growth) / 2**20:.1f} MiB between identical rounds"


def test_idle_server_does_not_spin(load_rounds):
    """Once the load is over nothing runs: the engine core and the frontend must sleep, not burn the CPU."""
    used = load_rounds["idle_cpu_s"]
    assert max(used) < 0.1 * IDLE_CPU_WINDOW_S, \
        f"CPU seconds used by (server, engine core) in {IDLE_CPU_WINDOW_S} s of idling: {used}"


# ---- preemption under pressure ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pressured_server(start_server):
    return start_server(PRESSURED_ARGS)


def test_preemption_under_pressure_keeps_greedy_outputs(pressured_server, load_rounds, record_reliability):
    jobs = load_rounds["jobs"][:NUM_PRESSURED_JOBS]
    reference = load_rounds["rounds"][0]["outcomes"][:NUM_PRESSURED_JOBS]
    before = pressured_server.metrics()
    started = time.monotonic()
    outcomes = asyncio.run(run_jobs(pressured_server.url, jobs))
    seconds = time.monotonic() - started
    values = pressured_server.wait_idle(IDLE_TIMEOUT_S)
    problems = {**check_outcomes(jobs, outcomes), **differences(outcomes, reference)}
    num_preemptions = values["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"]
    record_reliability(
        "preemption: the load's first half on a KV pool for ~3 of its sequences", clients=len(jobs),
        requests=len(jobs),
        lost_requests=len(problems), server_errors=num_server_errors(outcomes),
        kv_leaked=values["vllm:kv_cache_usage_perc"],
        detail=f"{num_preemptions:.0f} preemptions; greedy texts {len(jobs) - len(problems)}/{len(jobs)} equal "
               f"to the unpressured server's; {seconds:.0f} s")
    assert not problems, describe(problems)
    assert num_preemptions > 0, "the pool was not small enough to preempt"
    assert_idle(values)


# ---- disconnect storm ------------------------------------------------------------------------------

NUM_GOOD = 4  # clients that stay, each with a request of the load whose reference text is known
NUM_MID_STREAM = 4  # hang up after their first token
NUM_BEFORE_FIRST_TOKEN = 8  # hang up before any token: half once the headers are in, half non-streamed
STORM_IDLE_TIMEOUT_S = 10.0
NUM_QUEUED = 16  # streams that hang up together once all of them are in and at least half are waiting


def drop_body(i: int, stream: bool = True) -> tuple[str, dict]:
    """A long request (DROP_MAX_TOKENS, ignore_eos) for a client that will not wait for it: a chat every
    third time."""
    body = {"model": MODEL, "max_tokens": DROP_MAX_TOKENS, "ignore_eos": True, "stream": stream}
    if i % 3 == 1:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"Dropper {i}, go on."}]}
    return "/v1/completions", {**body, "prompt": f"Dropper {i} tells a long story:"}


def chunk_text(chunk: dict) -> str:
    return "".join(choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                   for choice in chunk["choices"])


async def dropper(http: httpx.AsyncClient, i: int, hang_up: str, release: asyncio.Event | None = None,
                  arrived: list[int] | None = None) -> None:
    """A client that will not wait for its request. It hangs up after the first token ("token"), as soon
    as the response headers are in ("headers"), or once `release` is set: streamed ("release"), after
    adding itself to `arrived` once its headers are in; not streamed ("release-plain"), long before the
    server's answer could come."""
    path, body = drop_body(i, stream=hang_up != "release-plain")
    if not body["stream"]:
        request = asyncio.ensure_future(http.post(path, json=body))
        await release.wait()
        assert not request.done(), f"a dropped request was answered: {request.result().text[:200]}"
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        return
    async with http.stream("POST", path, json=body) as response:  # leaving the block closes the connection
        assert response.status_code == 200, (await response.aread())[:300]
        if hang_up == "token":
            async for line in response.aiter_lines():
                if line.startswith("data: {") and chunk_text(json.loads(line.removeprefix("data: "))):
                    return
            raise AssertionError("the stream ended before its first token")
        if hang_up == "release":
            arrived.append(i)
            await release.wait()


async def storm(server, good_jobs: list[Job]) -> dict:
    """The staying clients first (the oldest requests, so never preempted for the droppers'), then the
    droppers: mid-stream ones until they have hung up, then the rest, which hang up once all the queued
    streams are in."""
    async with openai_client(server.url) as client, httpx.AsyncClient(base_url=server.url,
                                                                      timeout=CLIENT_TIMEOUT_S) as http:
        good = [asyncio.ensure_future(run_job(client, job)) for job in good_jobs]
        await wait_for_metrics(server, lambda v: v["vllm:num_requests_running"] >= len(good_jobs))
        results = await asyncio.gather(*(dropper(http, i, "token") for i in range(NUM_MID_STREAM)),
                                       return_exceptions=True)
        release, arrived = asyncio.Event(), []
        later = [dropper(http, i, "release-plain", release) for i in range(NUM_BEFORE_FIRST_TOKEN // 2)]
        later += [dropper(http, i, "headers") for i in range(NUM_BEFORE_FIRST_TOKEN // 2)]
        later += [dropper(http, i, "release", release, arrived) for i in range(NUM_QUEUED)]
        later = [asyncio.ensure_future(coroutine) for coroutine in later]
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while len(arrived) < NUM_QUEUED:
            failed = [task.exception() for task in later if task.done() and task.exception()]
            if failed:
                raise failed[0]
            assert time.monotonic() < deadline, f"only {len(arrived)} of the queued streams got their headers"
            await asyncio.sleep(0.05)
        # the engine's stats come with its steps: wait for one that shows the queued streams waiting
        at_release = await wait_for_metrics(server, lambda v: v["vllm:num_requests_waiting"] >= NUM_QUEUED // 2)
        release.set()
        results += await asyncio.gather(*later, return_exceptions=True)
        return {"good": await asyncio.gather(*good), "dropper_errors": [repr(r) for r in results if r is not None],
                "at_release": at_release}


def test_disconnect_storm_aborts_the_dropped_and_spares_the_rest(pressured_server, load_rounds,
                                                                   record_reliability):
    jobs, reference = load_rounds["jobs"], load_rounds["rounds"][0]["outcomes"]
    picked = [i for i, job in enumerate(jobs) if job.n == 1 and job.stop is None and job.max_tokens >= 12][:NUM_GOOD]
    server = pressured_server
    before = server.metrics()
    result = asyncio.run(storm(server, [jobs[i] for i in picked]))
    # Once the staying clients are done the engine must be idle within a step or two: a dropped request that
    # was not aborted would keep it busy for DROP_MAX_TOKENS steps.
    values = server.wait_idle(STORM_IDLE_TIMEOUT_S)
    good = result["good"]
    problems = {**check_outcomes([jobs[i] for i in picked], good),
                **differences(good, [reference[i] for i in picked])}
    # An aborted request never finishes: the good ones are the only requests to end normally.
    num_finished = (values["vllm:e2e_request_latency_seconds_count"]
                    - before["vllm:e2e_request_latency_seconds_count"])
    num_dropped = NUM_MID_STREAM + NUM_BEFORE_FIRST_TOKEN + NUM_QUEUED
    num_waiting = result["at_release"]["vllm:num_requests_waiting"]
    record_reliability(
        "disconnect storm: clients hang up mid-stream, before the first token and while queued",
        clients=NUM_GOOD + num_dropped, requests=NUM_GOOD + num_dropped,
        lost_requests=len(problems) + len(result["dropper_errors"]), server_errors=num_server_errors(good),
        kv_leaked=values["vllm:kv_cache_usage_perc"],
        detail=f"{NUM_MID_STREAM} hung up mid-stream, {NUM_BEFORE_FIRST_TOKEN} before the first token, "
               f"{NUM_QUEUED} with {num_waiting:.0f} requests waiting (--max-num-seqs {MAX_NUM_SEQS}); "
               f"{num_finished - NUM_GOOD:.0f} dropped requests ran to their end; "
               f"{NUM_GOOD - len(problems)}/{NUM_GOOD} staying clients got the unpressured server's greedy text")
    assert not problems, describe(problems)
    assert not result["dropper_errors"], result["dropper_errors"]
    assert num_finished == NUM_GOOD, f"{num_finished - NUM_GOOD:.0f} dropped requests were not aborted"
    assert_idle(values)


# ---- the engine core killed under load -------------------------------------------------------------

NUM_KILLED_STREAMS = 24
NUM_KILLED_PLAIN = 8  # non-streamed requests in flight
FAILURE_TIMEOUT_S = 30.0  # every request in flight must have its error by then
EXIT_TIMEOUT_S = 15.0  # the server must have exited by then (it exits 2 s after the core's death)


async def doomed_request(http: httpx.AsyncClient, i: int, stream: bool) -> str | None:
    """The error message a request ended with: from a 5xx body or an error event in the stream; None if
    it ended without one."""
    path, body = drop_body(i, stream)
    if not stream:
        response = await http.post(path, json=body)
        return response.json()["error"]["message"] if response.status_code >= 500 else None
    async with http.stream("POST", path, json=body) as response:
        if response.status_code >= 500:
            return json.loads(await response.aread())["error"]["message"]
        async for line in response.aiter_lines():
            if line.startswith('data: {"error"'):
                return json.loads(line.removeprefix("data: "))["error"]["message"]
    return None


async def kill_under_load(server) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT_S) as http:
        requests = [asyncio.ensure_future(doomed_request(http, i, stream=i < NUM_KILLED_STREAMS))
                    for i in range(NUM_KILLED_STREAMS + NUM_KILLED_PLAIN)]
        # every request is in the engine, some running, the rest waiting
        busy = await wait_for_metrics(server, lambda v: v["vllm:num_requests_running"] > 0 and
                                      v["vllm:num_requests_running"] + v["vllm:num_requests_waiting"] == len(requests))
        os.kill(server.core_pid, signal.SIGKILL)
        killed = time.monotonic()
        health_503_s = None
        while health_503_s is None and server.proc.poll() is None:
            try:
                if (await http.get("/health", timeout=5)).status_code == 503:
                    health_503_s = time.monotonic() - killed
            except httpx.TransportError:  # the server is already on its way out
                break
            await asyncio.sleep(0.05)
        done, hung = await asyncio.wait(requests, timeout=FAILURE_TIMEOUT_S)
        for request in hung:
            request.cancel()
        errors = [r.result() if not r.exception() else repr(r.exception()) for r in done]
        try:
            exit_code = await asyncio.to_thread(server.proc.wait, EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            exit_code = None
        return {"busy": busy, "errors": errors, "num_hung": len(hung), "health_503_s": health_503_s,
                "exit_code": exit_code, "exit_s": time.monotonic() - killed}


def test_engine_core_killed_under_load_fails_every_request_and_exits(pressured_server, record_reliability):
    """SIGKILL to the engine core with requests running and waiting: each ends with an error that says the
    engine died (none hangs, none ends silently), /health turns 503, and the server exits with status 1."""
    result = asyncio.run(kill_under_load(pressured_server))
    num_requests = NUM_KILLED_STREAMS + NUM_KILLED_PLAIN
    told = [e for e in result["errors"] if e and "engine core process died" in e]
    record_reliability(
        "engine core killed (SIGKILL) under load", clients=num_requests, requests=num_requests,
        lost_requests=num_requests - len(told), server_errors=None, kv_leaked=None,
        detail=f"{result['busy']['vllm:num_requests_running']:.0f} running and "
               f"{result['busy']['vllm:num_requests_waiting']:.0f} waiting at the kill; {len(told)}/{num_requests} "
               f"ended with the engine's death as their error (5xx by design); /health 503 after "
               f"{result['health_503_s'] or float('nan'):.2f} s; exit status {result['exit_code']} after "
               f"{result['exit_s']:.1f} s")
    assert result["num_hung"] == 0, f"{result['num_hung']} requests hung after the engine core died"
    assert len(told) == num_requests, result["errors"]
    assert result["health_503_s"] is not None, "/health never answered 503"
    assert result["exit_code"] == 1
