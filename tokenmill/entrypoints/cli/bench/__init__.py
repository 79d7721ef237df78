"""`tokenmill bench throughput | latency | prefix | serve`: each benchmark module has register(subparsers).

Offline benchmarks run the engine in this process (`LLM`); `serve` load-tests any OpenAI-compatible
server. Each writes a JSON record with the device, commit and exact command (common.py).
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("throughput", "latency", "prefix", "serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: throughput, latency, prefix, serve")
    bench_subparsers = parser.add_subparsers(dest="bench_command", required=True)
    for name in BENCHMARKS:
        importlib.import_module(f"tokenmill.entrypoints.cli.bench.{name}").register(bench_subparsers)
