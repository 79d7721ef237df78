"""Pipeline parallelism on the CPU (gloo, the mp executor): the layers in stages, activations sent from stage to
stage, as many micro-batches in flight as there are stages, the last stage's tokens returned to the engine and
sent to the stages with the request's next step. Greedy tokens and logprobs must equal one rank's on the same
float32 weights, alone and combined with tensor parallelism."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.distributed import parallel_state

KWARGS = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=256)
PROMPTS = [list(range(5 + i, 40 + 3 * i)) for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2, prompt_logprobs=1)


def generate(path: str, tp: int, pp: int, prompts=PROMPTS, params=GREEDY, **kwargs) -> tuple[list, object]:
    llm = LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              **{"kv_cache_memory_bytes": 8 << 20, **KWARGS, **kwargs})
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        core = llm.llm_engine.core
        core.scheduler.check_integrity()
        return [_summary(o) for o in outputs], core.stats()
    finally:
        llm.llm_engine.shutdown()


def _summary(output) -> tuple:
    """Tokens, and each step's logprobs then the prompt's as (token, logprob) pairs."""
    completion = output.outputs[0]
    steps = [*(completion.logprobs or []), *(step for step in output.prompt_logprobs or [] if step is not None)]
    return completion.token_ids, [(k, v.logprob) for step in steps for k, v in step.items()]


def assert_same(outputs: list, reference: list, what: str) -> None:
    """Equal tokens; logprobs equal up to float32's noise (a tensor-parallel sum adds in another order)."""
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(outputs, reference, strict=True):
        assert tokens == ref_tokens, what
        assert [k for k, _ in logprobs] == [k for k, _ in ref_logprobs], what
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(logprobs, ref_logprobs)), what


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pp2_and_tp2_x_pp2_give_one_ranks_greedy_tokens(arch, tiny_model_dir):
    """Two layers, one a stage; qwen3 ties its embeddings, so its last stage loads the embedding as its head."""
    path = tiny_model_dir(arch)
    one, _ = generate(path, 1, 1)
    assert_same(generate(path, 1, 2)[0], one, "PP=2")
    assert_same(generate(path, 2, 2)[0], one, "TP=2 x PP=2")
    assert parallel_state.get_pp_size() == 1 and not torch.distributed.is_initialized()  # left cleanly


def test_preemption_and_prefix_caching_stay_exact(tiny_model_dir):
    """14 blocks of 16 tokens, on each stage for its layer: the batch does not fit, so requests are preempted
    and recomputed; two prompts share a prefix."""
    path = tiny_model_dir("llama")
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 40000, (n,), generator=generator).tolist() for n in (9, 16, 40, 70, 33, 50)]
    prompts.append(prompts[2][:32] + [5, 6, 7])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (30, 17, 24, 40, 25, 35, 20)]
    probe = LLM(path, kv_cache_memory_bytes=1 << 20, **KWARGS)
    per_block = probe.llm_engine.core.worker.kv_bytes_per_block()  # both layers'
    del probe
    one, _ = generate(path, 1, 1, prompts, params, kv_cache_memory_bytes=14 * per_block, max_model_len=200)
    two, stats = generate(path, 1, 2, prompts, params, kv_cache_memory_bytes=7 * per_block, max_model_len=200)
    assert_same(two, one, "PP=2 under preemption")
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_embedded_gguf_model_in_three_stages():
    """30 layers in stages of 10, the GGUF loader's tensors each going to the stage that holds them; the tied
    embedding is the first stage's and, as the head, the last's."""
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    texts = {}
    for pp in (1, 3):
        llm = LLM(pipeline_parallel_size=pp, kv_cache_memory_bytes=32 << 20, max_model_len=512)
        texts[pp] = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.shutdown()
    assert texts[3] == texts[1] and all(texts[1])


def _generate_counting_micro_batches(path: str, pp: int, prompts: list[str], params: list[SamplingParams]
                                     ) -> tuple[list[str], list[int], list[int]]:
    """Texts, and at each wait for a step's tokens the steps then in flight, and each launched step's size."""
    llm = LLM(path, pipeline_parallel_size=pp, dtype="float32", max_model_len=256, kv_cache_memory_bytes=8 << 20)
    core = llm.llm_engine.core
    in_flight, batch_sizes = [], []
    next_output, launch = getattr(core.executor, "next_output", None), core._launch

    def counted_next_output():
        in_flight.append(len(core.in_flight) + 1)  # the oldest is already popped
        return next_output()

    def counted_launch():
        step = launch()
        batch_sizes.append(len(step.req_ids))
        return step

    core.executor.next_output, core._launch = counted_next_output, counted_launch
    try:
        texts = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        core.scheduler.check_integrity()
        return texts, in_flight, batch_sizes
    finally:
        llm.llm_engine.shutdown()


def test_micro_batches_fill_the_pipeline(tiny_model_dir):
    """Six requests in two stages: two micro-batches in flight, each of three requests, and the tokens of one
    rank, grammar-constrained requests (masks filled from tokens the last stage returned) included."""
    path = tiny_model_dir("llama")
    prompts = [f"Request number {i} says" for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) for _ in range(4)]
    params += [SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(
        choice=["alpha beta", "gamma delta epsilon"])) for _ in range(2)]
    one, _, _ = _generate_counting_micro_batches(path, 1, prompts, params)
    two, in_flight, batch_sizes = _generate_counting_micro_batches(path, 2, prompts, params)
    assert two == one
    assert set(one[4:]) <= {"alpha beta", "gamma delta epsilon"}
    assert max(in_flight) == 2 and in_flight.count(2) > 10
    assert max(batch_sizes) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(pipeline_parallel_size=0), "pipeline_parallel_size must be a positive integer"),
    (dict(pipeline_parallel_size=3), r"pipeline_parallel_size must be at most the model's num_hidden_layers \(2\)"),
    (dict(pipeline_parallel_size=2, distributed_executor_backend="uni"), "'uni' runs one rank"),
    (dict(data_parallel_size=0), "data_parallel_size must be a positive integer"),
    (dict(data_parallel_size=2), r"data_parallel_size > 1 runs engine cores behind the server"),
])
def test_impossible_layouts_are_refused_naming_the_flag(kwargs, message, tiny_model_dir):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model_dir("llama"), kv_cache_memory_bytes=8 << 20, **KWARGS, **kwargs)
