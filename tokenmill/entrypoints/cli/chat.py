"""`tokenmill chat`: an interactive conversation, tokens streamed to the terminal as they come."""

from __future__ import annotations

import argparse
import sys

from tokenmill.entrypoints.cli.engine_args import add_engine_args, add_sampling_args, engine_kwargs, sampling_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal")
    parser.add_argument("--system", default=None, help="a system prompt")
    add_engine_args(parser)
    add_sampling_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams
    from tokenmill.sampling_params import RequestOutputKind

    llm = LLM(**engine_kwargs(args))
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    for turn in range(10**9):
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        params = SamplingParams(**sampling_kwargs(args), output_kind=RequestOutputKind.DELTA)
        engine.add_request(f"chat-{turn}", {"prompt": text,
                                            "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)},
                           params)
        reply = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                delta = output.outputs[0].text
                reply.append(delta)
                print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
