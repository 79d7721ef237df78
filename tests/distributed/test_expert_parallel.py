"""Expert parallelism on the CPU (gloo, the mp executor): each tensor-parallel rank holds 1/tp of the MoE
layers' experts whole, attention stays tensor-parallel. Greedy tokens must equal one rank's on the same float32
weights, with chunked prefills batched beside decodes. Over data-parallel cores (a server's engine) the cores'
ranks share the experts and exchange tokens all-to-all."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.distributed import parallel_state

KWARGS = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=256, kv_cache_memory_bytes=8 << 20)
PROMPTS = [list(range(5 + i, 40 + 3 * i)) for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def generate(path: str, **kwargs) -> list[list[int]]:
    llm = LLM(path, **KWARGS, **kwargs)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        llm.llm_engine.core.scheduler.check_integrity()
        if kwargs.get("enable_expert_parallel"):  # rank 0 (this process) holds the first 1/tp of the experts
            experts = [m for m in llm.llm_engine.core.worker.runner.model.modules() if hasattr(m, "w13_weight")]
            assert experts and all(m.w13_weight.shape[0] * kwargs["tensor_parallel_size"] == m.num_experts
                                   and m.first_expert == 0 for m in experts)
        return [o.outputs[0].token_ids for o in outputs]
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("arch, tp", [("qwen3_moe", 2), ("mixtral", 4)])
def test_expert_parallel_gives_one_ranks_greedy_tokens(arch, tp, tiny_model_dir, caplog):
    """qwen3_moe: 8 experts, 4 a rank, and a dense layer that stays tensor-parallel; mixtral: 4 experts, one a
    rank. 16-token steps split the 35-44-token prompts into chunks beside other requests' decodes."""
    path = tiny_model_dir(arch)
    one = generate(path)
    with caplog.at_level(logging.INFO, logger="tokenmill.engine.core"):
        assert generate(path, tensor_parallel_size=tp, enable_expert_parallel=True, max_num_batched_tokens=16) == one
    num_experts = {"qwen3_moe": 8, "mixtral": 4}[arch]
    assert f"expert parallelism: EP size {tp} (the tensor-parallel ranks), {num_experts // tp} of the " \
           f"{num_experts} experts per rank" in caplog.text
    assert parallel_state.get_ep_size() == 1 and not torch.distributed.is_initialized()  # left cleanly


def test_experts_that_do_not_divide_over_the_ranks_are_refused_naming_the_flag(tiny_model_dir, tmp_path):
    """6 experts over 4 ranks; without expert parallelism TP=4 splits each expert's intermediate dim instead.
    Refused before any rank starts."""
    shutil.copytree(tiny_model_dir("qwen3_moe"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())  # transformers 5 names num_experts so
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 6}))
    with pytest.raises(ValueError, match=r"enable_expert_parallel spreads the experts over the tensor_parallel_size "
                                         r"ranks; the model's 6 experts are not divisible by 4"):
        LLM(str(tmp_path), tensor_parallel_size=4, enable_expert_parallel=True, **KWARGS)


def server_engine(path: str, **kwargs):
    """A server's engine (AsyncLLM, which may run several cores) on `path` with KWARGS and `kwargs`."""
    from tokenmill.engine.async_llm import AsyncLLM

    engine_kwargs = {k: v for k, v in KWARGS.items() if k != "skip_tokenizer_init"}
    return AsyncLLM(EngineConfig.from_kwargs(model=path, usage_context="serve", **engine_kwargs, **kwargs),
                    startup_timeout_s=300)


def generate_over_cores(path: str, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    """Greedy tokens of `prompts`, sent at once, from a server's engine with `kwargs`."""
    engine = server_engine(path, **kwargs)

    async def run() -> list[list[int]]:
        engine.start()

        async def one(i: int, prompt: list[int]) -> list[int]:
            outputs = [o async for o in engine.generate({"prompt_token_ids": prompt}, GREEDY, f"r{i}")]
            return outputs[-1].outputs[0].token_ids

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tp", [1, 2])
def test_expert_parallel_over_data_parallel_cores_gives_one_cores_greedy_tokens(tp, tiny_model_dir):
    """Two data-parallel cores (of tp ranks each) share the 8 experts, 4 / tp a rank, and exchange tokens
    all-to-all: the greedy tokens equal one core's, for four requests spread over both cores (chunked beside
    decodes) and for one request alone, whose core's steps the idle core joins with made-up ones."""
    path = tiny_model_dir("qwen3_moe")
    one = generate(path)
    spread = dict(data_parallel_size=2, enable_expert_parallel=True, tensor_parallel_size=tp)
    assert generate_over_cores(path, PROMPTS, max_num_batched_tokens=16, **spread) == one
    assert generate_over_cores(path, PROMPTS[1:2], **spread) == one[1:2]


def test_expert_parallel_over_cores_refuses_a_pipeline_ray_and_speculation():
    spread = dict(data_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be 1 when enable_expert_parallel spreads"):
        EngineConfig.from_kwargs(pipeline_parallel_size=2, **spread)
    with pytest.raises(ValueError, match="speculative_config does not work with enable_expert_parallel over"):
        EngineConfig.from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 2}, **spread)
    with pytest.raises(ValueError, match="distributed_executor_backend 'ray' places ranks on several hosts"):
        EngineConfig.from_kwargs(distributed_executor_backend="ray", tensor_parallel_size=2, **spread)


def test_a_core_that_dies_ends_the_requests_of_cores_sharing_its_experts(tiny_model_dir):
    """Cores in lock-step wait for one another: when one is killed mid-request, every request in flight ends with
    an error at once (no core waits out the collectives' timeout), and the other core's process ends too."""
    import psutil

    from tokenmill.engine.core_client import EngineDeadError

    engine = server_engine(tiny_model_dir("qwen3_moe"), data_parallel_size=2, enable_expert_parallel=True)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    cores = [psutil.Process(client.pid) for client in engine.client.clients]

    async def run() -> list:
        engine.start()

        async def one(i: int) -> BaseException | None:
            try:
                async for output in engine.generate({"prompt_token_ids": PROMPTS[i]}, long, f"r{i}"):
                    if i == 0 and len(output.outputs[0].token_ids) == 5:
                        cores[1].kill()
            except EngineDeadError as e:
                return e
            return None

        return await asyncio.wait_for(asyncio.gather(one(0), one(1)), timeout=60)

    try:
        started = time.monotonic()
        errors = asyncio.run(run())
        assert all(isinstance(e, EngineDeadError) for e in errors), errors
        assert time.monotonic() - started < 60
        cores[0].wait(timeout=30)  # the survivor's collectives fail once its peer is gone
    finally:
        engine.shutdown()
