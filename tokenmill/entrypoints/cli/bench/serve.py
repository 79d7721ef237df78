"""`tokenmill bench serve`: load-test any OpenAI-compatible server, as vLLM's `bench serve` does.

Requests stream /v1/completions with ignore_eos, so each produces exactly --output-len tokens;
prompts are random token ids in [0, 10000) (random words if the server takes only text). Arrivals
are a Poisson process at --request-rate (inf: all at once), at most --max-concurrency in flight.

    TTFT  time to first token: request sent -> first chunk with text
    ITL   inter-token latency: the gaps between chunks with text
    TPOT  time per output token after the first: (E2EL - TTFT) / (output tokens - 1), per request
    E2EL  end-to-end latency: request sent -> [DONE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from tokenmill.entrypoints.cli.bench.common import base_record

VOCAB_LIMIT = 10000
_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "number group problem fact water room mother area money story month lot right study book job word "
          "business issue side kind head house service friend father power hour game line end member law car city "
          "name team minute idea kid body information back parent face others level office door health art war "
          "history party result change morning reason research girl guy moment air teacher force education").split()


@dataclass
class RequestResult:
    ok: bool
    input_len: int
    output_len: int = 0  # completion tokens, from the server's usage when it reports them
    ttft: float = 0.0
    e2el: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser("serve", help="load-test an OpenAI-compatible server (streaming "
                                                       "/v1/completions): throughput, TTFT, TPOT, ITL, latency")
    parser.add_argument("--base-url", default="http://localhost:8000")
    parser.add_argument("--model", default=None, help="model name (default: the server's first in /v1/models)")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals; inf sends them all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths are uniform in [len * (1 - r), len * (1 + r)]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--result-file", default=None, help="write the results as JSON here")
    parser.set_defaults(func=run)


def _lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    low, high = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def make_prompts(args: argparse.Namespace, text: bool) -> tuple[list[list[int] | str], list[int], list[int]]:
    rng = random.Random(args.seed)
    input_lens = _lengths(rng, args.num_prompts, args.input_len, args.random_range_ratio)
    output_lens = _lengths(rng, args.num_prompts, args.output_len, args.random_range_ratio)
    if text:
        prompts = [" ".join(rng.choice(_WORDS) for _ in range(n)) for n in input_lens]
    else:
        prompts = [[rng.randrange(VOCAB_LIMIT) for _ in range(n)] for n in input_lens]
    return prompts, input_lens, output_lens


async def _send(client, url: str, payload: dict, input_len: int) -> RequestResult:
    result = RequestResult(ok=False, input_len=input_len)
    num_chunks = 0
    started = time.perf_counter()
    last = started
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if any(choice.get("text") for choice in chunk.get("choices") or ()):
                    if num_chunks == 0:
                        result.ttft = now - started
                    else:
                        result.itls.append(now - last)
                    last = now
                    num_chunks += 1
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
        result.e2el = time.perf_counter() - started
        result.output_len = result.output_len or num_chunks
        result.ok = num_chunks > 0
        if not result.ok:
            result.error = "no text was streamed"
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        result.error = f"{type(e).__name__}: {e}"
    return result


def _payload(model: str, prompt: list[int] | str, output_len: int, stream: bool = True) -> dict:
    payload = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
    if stream:
        payload.update(stream=True, stream_options={"include_usage": True})
    return payload


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`bench serve`'s arguments from a command line's words after `serve` (its defaults, its checks)."""
    parser = argparse.ArgumentParser(prog="tokenmill bench", exit_on_error=False)
    register(parser.add_subparsers(dest="bench_command", required=True))
    return parser.parse_args(["serve", *argv])


async def benchmark(args: argparse.Namespace, on_request_done: Callable[[int, int], None] | None = None,
                    describe_client: bool = True) -> dict:
    """Runs the load test; `on_request_done(num_done, num_prompts)` after each request (else a tqdm bar).
    describe_client=False leaves out the client's commit, device and command (a server benchmarking itself
    would import torch only to name its device)."""
    import httpx

    headers = {}
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts + 1, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        model = args.model
        if model is None:
            response = await client.get(f"{base}/v1/models")
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        url = f"{base}/v1/completions"
        # One short probe: is the server up, and does it take token-id prompts?
        probe = await client.post(url, json=_payload(model, [1, 2, 3], 1, stream=False))
        text_prompts = probe.status_code == 400
        if probe.status_code not in (200, 400):
            raise RuntimeError(f"probe request failed: HTTP {probe.status_code}: {probe.text[:500]}")
        if text_prompts:
            probe = await client.post(url, json=_payload(model, "hello", 1, stream=False))
            if probe.status_code != 200:
                raise RuntimeError(f"probe request failed: HTTP {probe.status_code}: {probe.text[:500]}")
        prompts, input_lens, output_lens = make_prompts(args, text_prompts)
        semaphore = asyncio.Semaphore(args.max_concurrency or len(prompts))
        rng = random.Random(args.seed + 1)

        bar = tqdm(total=len(prompts), desc="Requests done", unit="req", disable=on_request_done is not None)
        num_done = 0

        async def limited(i: int) -> RequestResult:
            nonlocal num_done
            async with semaphore:
                result = await _send(client, url, _payload(model, prompts[i], output_lens[i]), input_lens[i])
            bar.update(1)
            num_done += 1
            if on_request_done is not None:
                on_request_done(num_done, len(prompts))
            return result

        started = time.perf_counter()
        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(limited(i)))
            if args.request_rate != float("inf") and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        bar.close()
    return summarize(args, model, text_prompts, results, duration, describe_client)


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    array = np.asarray(values) * scale
    return {"mean": float(array.mean()), "median": float(np.median(array)), "p99": float(np.percentile(array, 99))}


def summarize(args: argparse.Namespace, model: str, text_prompts: bool, results: list[RequestResult],
              duration: float, describe_client: bool = True) -> dict:
    done = [r for r in results if r.ok]
    num_output = sum(r.output_len for r in done)
    num_input = sum(r.input_len for r in done)
    tpots = [(r.e2el - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    errors = [r.error for r in results if not r.ok]
    summary = {
        "base_url": args.base_url, "model": model, "prompt_kind": "text" if text_prompts else "token_ids",
        "num_prompts": args.num_prompts, "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "input_len": args.input_len, "output_len": args.output_len, "random_range_ratio": args.random_range_ratio,
        "completed": len(done), "failed": len(errors), "errors": errors[:10],
        "duration_s": duration, "total_input_tokens": num_input, "total_output_tokens": num_output,
        "request_throughput": len(done) / duration, "output_throughput": num_output / duration,
        "total_token_throughput": (num_input + num_output) / duration,
        "ttft_ms": _stats([r.ttft for r in done]), "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in done for x in r.itls]), "e2el_ms": _stats([r.e2el for r in done]),
        "requests": [asdict(r) | {"itls": None} for r in results],
    }
    if describe_client:
        record = base_record()
        summary |= {"client_commit": record["commit"], "client_device": record["device"], "command": record["command"]}
    return summary


def print_summary(summary: dict) -> None:
    rows = [
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Prompts", summary["prompt_kind"]),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total generated tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        rows.append((f"-{title}-", None))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize() if stat != 'p99' else 'P99'} {key.split('_')[0].upper()} (ms)",
                         f"{summary[key][stat]:.2f}"))
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    for name, value in rows:
        if value is None:
            print("{s:{c}^50}".format(s=name.strip("-"), c="-"))
        else:
            print(f"{name + ':':<40}{value!s:>10}")
    print("=" * 50)
    for error in summary["errors"][:3]:
        print(f"error: {error}")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    summary = asyncio.run(benchmark(args))
    print_summary(summary)
    if args.result_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.result_file)), exist_ok=True)
        with open(args.result_file, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["completed"] else 1
