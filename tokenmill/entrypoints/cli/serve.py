"""`tokenmill serve [MODEL]`: the OpenAI-compatible HTTP server (vLLM's flags)."""

from __future__ import annotations

import argparse
import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor

from tokenmill.entrypoints.cli.engine_args import add_engine_args
from tokenmill.entrypoints.openai.limits import RequestLimits


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                   description="Serve a model over an OpenAI-compatible HTTP API: /v1/completions, "
                                               "/v1/chat/completions, /v1/models, /health, /metrics, /tokenize, "
                                               "/detokenize, /version.")
    add_engine_args(parser, model_positional=True)
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on every route but /health "
                             "(default: $TOKENMILL_API_KEY)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) the API accepts; the first is the one responses report "
                             "(default: the model argument, or SmolLM2-135M-Instruct for the embedded model)")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template file (or the template itself) instead of the tokenizer's")
    parser.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                        help="how tool calls are read from the text when tool_choice is auto")
    parser.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=None,
                        help='allow tool_choice "auto" (default: on when the chat template renders tools in a format '
                             "a --tool-call-parser reads, which is then picked; the start-up log says which)")
    parser.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                        help="split <think>...</think> into message.reasoning_content")
    limits = RequestLimits()
    parser.add_argument("--max-request-body-bytes", type=int, default=limits.max_request_body_bytes,
                        help="larger request bodies are refused with 413 (default: %(default)s, 16 MiB)")
    parser.add_argument("--max-n", type=int, default=limits.max_n,
                        help="the largest `n` (choices per prompt) a request may ask for (default: %(default)s)")
    parser.add_argument("--max-stop-strings", type=int, default=limits.max_stop_strings,
                        help="the most entries a request's `stop` and `stop_token_ids` may each have "
                             "(default: %(default)s)")
    parser.add_argument("--max-stop-string-length", type=int, default=limits.max_stop_string_length,
                        help="the most characters one entry of a request's `stop` may have (default: %(default)s)")
    parser.add_argument("--max-json-depth", type=int, default=limits.max_json_depth,
                        help="how deeply lists and objects may nest in free-form fields (response_format, "
                             "structured_outputs, tools, tool_choice, chat_template_kwargs) (default: %(default)s)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM/SIGINT, seconds in-flight requests get to finish while new connections "
                             "are refused; then they are cut and the server exits (default: %(default)s)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--disable-uvicorn-access-log", action="store_true")
    parser.add_argument("--disable-playground", action="store_true",
                        help="serve no web playground at / (by default its page and static files are public; "
                             "everything it does goes through the API, behind --api-key)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    """Refuses a port in use before anything loads; spawns the engine core first, so that it loads the weights
    while this process imports the web server and loads the tokenizer; then serves."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.entrypoints.cli.engine_args import engine_kwargs

    sock = listen_socket(args.host, args.port)
    try:
        names = served_model_names(args)
        config = EngineConfig.from_kwargs(**engine_kwargs(args), served_model_name=names[0], usage_context="serve")
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-start") as pool:
            starting = pool.submit(AsyncLLM, config)
            from tokenmill.entrypoints.openai.api_server import run_server

            engine = starting.result()
    except BaseException:
        sock.close()
        raise
    return asyncio.run(run_server(args, engine, sock, names))


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound now (uvicorn listens on it once the engine is ready): a port another
    program holds is an error before any model loads, not after."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot serve on {host}:{port}: {e.strerror}; is another server running there? Choose "
                      "another port with --port") from None
    return sock


def served_model_names(args: argparse.Namespace) -> list[str]:
    from tokenmill.source.default_model import DEFAULT_MODEL_NAME

    if args.served_model_name:
        return list(args.served_model_name)
    return [DEFAULT_MODEL_NAME if args.model in (None, "", "default") else args.model]
