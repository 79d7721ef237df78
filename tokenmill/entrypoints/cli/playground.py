"""`tokenmill playground`: a web page that starts, stops and switches `tokenmill serve` engines, with the
serve playground's chat, completions, server and benchmark tabs on the engine chosen (playground/manager.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("playground", help="a web page to start, stop and try `tokenmill serve` engines",
                                   description="Serve the web playground with an Engines tab: each engine is a "
                                               "`tokenmill serve` subprocess on a free local port, reached through "
                                               "this server.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s: the page starts processes on this machine)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on this server's API and proxy (the page asks "
                             "for it), and start every engine with it (default: $TOKENMILL_API_KEY)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.set_defaults(func=_playground)


def _playground(args: argparse.Namespace) -> int:
    from tokenmill.entrypoints.playground.manager import run_manager

    return run_manager(args)
