"""`tokenmill generate "prompt" ...`: one completion per prompt, printed in order.

It runs on the async engine, as `serve` does: the engine core is a process of its own that imports torch and
loads the weights while this one loads the tokenizer, so the two overlap (on two cores, a second of a cold
start), and this process never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio

from tokenmill.entrypoints.cli.engine_args import add_engine_args, add_sampling_args, engine_kwargs, sampling_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="complete a prompt and print the result")
    parser.add_argument("prompt", nargs="+", help="one or more prompts")
    add_engine_args(parser)
    add_sampling_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.config import EngineConfig
    from tokenmill.engine.dp_client import make_core_client

    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    client = make_core_client(config)  # the core imports torch while this process imports the rest
    try:
        from tokenmill.engine.async_llm import AsyncLLM
        from tokenmill.sampling_params import RequestOutputKind, SamplingParams

        engine = AsyncLLM(config, client=client)
    except BaseException:
        client.shutdown()
        raise
    try:
        params = SamplingParams(**sampling_kwargs(args, engine.sampling_defaults),
                                output_kind=RequestOutputKind.FINAL_ONLY)
        texts = asyncio.run(_complete(engine, args.prompt, params))
    finally:
        engine.shutdown()
    for prompt, text in zip(args.prompt, texts):
        print(prompt + text)
    return 0


async def _complete(engine, prompts: list[str], params) -> list[str]:
    async def one(index: int, prompt: str) -> str:
        text = ""
        async for output in engine.generate(prompt, params, f"generate-{index}"):
            text = output.outputs[0].text
        return text

    return list(await asyncio.gather(*(one(i, prompt) for i, prompt in enumerate(prompts))))
