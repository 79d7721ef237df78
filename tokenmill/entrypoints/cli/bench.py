"""`tokenmill bench throughput | latency | serve`: each benchmark module has register(subparsers)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("tokenmill.bench.throughput", "tokenmill.bench.latency", "tokenmill.bench.prefix",
              "tokenmill.bench.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: throughput, latency, prefix, serve")
    bench_subparsers = parser.add_subparsers(dest="bench_command", required=True)
    for module in BENCHMARKS:
        importlib.import_module(module).register(bench_subparsers)
