"""`tokenmill SUBCOMMAND ...`: each subcommand lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from tokenmill.engine.core_client import EngineDeadError

# When the command started (this package is the first of tokenmill's it imports): `bench latency` measures
# start-up from here, so the imports of torch and the engine count wherever they happen.
STARTED = time.perf_counter()

# subcommand -> module defining register(subparsers) -> None; the parser's `func` runs it
SUBCOMMANDS = {
    "generate": "tokenmill.entrypoints.cli.generate",
    "chat": "tokenmill.entrypoints.cli.chat",
    "serve": "tokenmill.entrypoints.cli.serve",
    "playground": "tokenmill.entrypoints.cli.playground",
    "bench": "tokenmill.entrypoints.cli.bench",
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill LLM inference engine")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).register(subparsers)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, EngineDeadError) as e:
        # What the user can fix (a bad flag, a model that is not there, a busy port, a cache too small) is one
        # line, not a traceback; anything else is a bug and keeps its traceback.
        print(f"tokenmill {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
