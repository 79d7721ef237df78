"""`tokenmill chat`: an interactive conversation, tokens streamed to the terminal as they come.

Ctrl-C during a reply stops it (what was written stays in the history); Ctrl-C or Ctrl-D at the prompt, or an
empty line, ends the chat.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tokenmill.entrypoints.cli.engine_args import add_engine_args, add_sampling_args, engine_kwargs, sampling_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal")
    parser.add_argument("--system", default=None, help="a system prompt")
    add_engine_args(parser)
    add_sampling_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill import LLM

    llm = LLM(**engine_kwargs(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message. Ctrl-C stops a reply; an empty line, Ctrl-C or Ctrl-D at the prompt ends the chat.",
          file=sys.stderr)
    for turn in range(10**9):
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": reply(llm, args, messages, f"chat-{turn}")})
    return 0


def reply(llm, args: argparse.Namespace, messages: list[dict], request_id: str) -> str:
    """Streams the model's answer to `messages` and returns it; Ctrl-C ends it early. The engine is stepped
    whole between checks of the interrupt, so stopping never leaves it half-way through a step."""
    from tokenmill import SamplingParams
    from tokenmill.sampling_params import RequestOutputKind

    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    pieces = []
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        params = SamplingParams(**sampling_kwargs(args, engine.sampling_defaults), output_kind=RequestOutputKind.DELTA)
        prompt = {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        engine.add_request(request_id, prompt, params)
        while engine.has_unfinished_requests():
            if interrupted.is_set():
                engine.abort_request([request_id])
                print(" [stopped]", end="")
                break
            for output in engine.step():
                pieces.append(output.outputs[0].text)
                print(pieces[-1], end="", flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    print(flush=True)
    return "".join(pieces)
