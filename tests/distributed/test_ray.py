"""The Ray executor on a local Ray cluster the test starts: tensor parallelism through Ray actors gives one
rank's greedy tokens, and an actor that dies fails the engine with its error."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.executor.multiproc import RankFailed

ray = pytest.importorskip("ray")

KWARGS = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=256, kv_cache_memory_bytes=8 << 20)
PROMPTS = [{"prompt_token_ids": list(range(5 + i, 40 + 3 * i))} for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_tp2_on_ray_gives_one_ranks_tokens_and_a_dead_actor_fails_the_engine(local_cluster, tiny_model_dir):
    path = tiny_model_dir("qwen2")
    one = LLM(path, **KWARGS)
    expected = [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)]
    one.llm_engine.shutdown()
    llm = LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray", **KWARGS)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
        ray.kill(llm.llm_engine.core.executor.actors[0])
        with pytest.raises(RankFailed, match="rank 1's Ray actor died"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
