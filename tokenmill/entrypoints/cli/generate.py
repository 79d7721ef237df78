"""`tokenmill generate "prompt" ...`: one completion, printed."""

from __future__ import annotations

import argparse

from tokenmill.entrypoints.cli.engine_args import add_engine_args, add_sampling_args, engine_kwargs, sampling_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="complete a prompt and print the result")
    parser.add_argument("prompt", nargs="+", help="one or more prompts")
    add_engine_args(parser)
    add_sampling_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(**sampling_kwargs(args, llm.llm_engine.sampling_defaults))
    outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for output in outputs:
        print(output.prompt + output.outputs[0].text)
    return 0
