import pytest

from tokenmill.config import EngineConfig
from tokenmill.source import resolve_model
from tokenmill.worker.worker import Worker


@pytest.fixture(scope="module")
def cpu_worker(tiny_model_dir) -> Worker:
    """A Worker on the CPU (even where a GPU is) over the tiny random Llama, taken through start-up as the
    engine core does: a 1 MiB KV cache, 64-token sequences, 4-token steps, no async scheduling. Each test
    module gets its own."""
    source = resolve_model(tiny_model_dir("llama"))
    config = EngineConfig.from_kwargs(model=source.path, kv_cache_memory_bytes=1 << 20, max_model_len=64,
                                      max_num_batched_tokens=4, async_scheduling=False, device="cpu")
    worker = Worker(config, source)
    worker.load_model(config.resolve(source.hf_config, worker.device_info()))
    worker.initialize_cache(worker.determine_num_blocks())
    worker.compile_or_warm_up()  # on the CPU: nothing to capture or warm up
    return worker
