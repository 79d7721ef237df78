"""A Worker driven by hand through its life cycle on the CPU, its steps checked against HF transformers:
device info, the resolved config, KV sizing, then prefill and decode steps whose greedy tokens equal HF's."""

from __future__ import annotations

import torch
import transformers

from tokenmill.config import DeviceInfo
from tokenmill.core.interface import CachedRequestData, NewRequestData, SchedulerOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.worker import Worker

PROMPT = [5, 17, 42, 8, 99, 3]


def hf_greedy(path: str, num_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=num_tokens, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def run_step(worker: Worker, output: SchedulerOutput) -> tuple[list[str], list[list[int]]]:
    info = worker.execute_model(output)
    worker.sample_tokens()
    result = worker.finish_step()
    assert result.req_ids == info.req_ids
    return info.req_ids, result.sampled_token_ids


def test_life_cycle(cpu_worker):
    """What the fixture (tests/worker/conftest.py) did: the config resolved for the CPU, the budget in blocks."""
    assert cpu_worker.device_info() == DeviceInfo("cpu")
    assert cpu_worker.config.model.dtype == "float32" and cpu_worker.config.scheduler.max_num_batched_tokens == 4
    assert cpu_worker.runner.kv_cache.pool.shape[2] == (1 << 20) // cpu_worker.kv_bytes_per_block()


def test_chunked_prefill_then_decode_match_hf(cpu_worker, tiny_model_dir):
    worker = cpu_worker
    # the 6-token prompt in chunks of 4 and 2 (blocks of 16: one block), then 3 decode steps
    new = NewRequestData("a", PROMPT, [], SamplingParams(temperature=0, max_tokens=4), [0], 0)
    assert run_step(worker, SchedulerOutput([new], [], {"a": 4}, 4, set(), set())) == (["a"], [[]])
    tokens = []
    for computed, num_new in ((4, 2), (6, 1), (7, 1), (8, 1)):
        output = SchedulerOutput([], [CachedRequestData("a", [], computed)], {"a": num_new}, num_new, set(), set())
        _, [sampled] = run_step(worker, output)
        tokens += sampled
    assert tokens == hf_greedy(tiny_model_dir("llama"), 4)
    assert worker.runner.batch.token_ids[0, :10].tolist() == PROMPT + tokens
    # the request leaves: its row and state are gone
    run_step(worker, SchedulerOutput([], [], {}, 0, set(), {"a"}))
    assert worker.runner.batch.num_reqs == 0 and not worker.runner.states
