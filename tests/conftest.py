import atexit
import os

import torch

# Without a GPU, Triton kernels run in its interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _silence_interpreter_teardown() -> None:
    """After the run is reported: Triton's native objects, torn down with the interpreter, make nanobind print
    a leak report of some 30 lines that says nothing about tokenmill (Triton silences its own workers so)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


atexit.register(_silence_interpreter_teardown)

if os.environ.get("TOKENMILL_SM90_COMPILE") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
    from triton_sm90 import compile_recorded, start_recording

    start_recording()

    def pytest_sessionfinish(session, exitstatus) -> None:
        """Every kernel variant the tests launched, compiled for sm_90 (tests/triton_sm90.py)."""
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        count, failures = compile_recorded()
        reporter.write_line(f"sm_90 compilation of the {count} Triton kernel variants the tests launched: "
                            f"{len(failures)} failed")
        for failure in failures:
            reporter.write_line(f"  {failure}", red=True)
        if failures:
            session.exitstatus = 1


import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's tokenizer (converted from its GGUF once, then cached on disk)."""
    from tokenmill.source.default_model import default_model_path
    from tokenmill.source.gguf_file import load_gguf_tokenizer

    return load_gguf_tokenizer(default_model_path())


TINY_ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "mistral_window", "qwen2_window", "gpt_oss",
              "deepseek_v2", "deepseek_v2_q_lora", "deepseek_v3")


def _tiny_config(arch: str):
    import transformers

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.1, tie_word_embeddings=arch == "qwen3", bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                "original_max_position_embeddings": 128})
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral_window":  # every layer sees the last 6 keys
        return transformers.MistralConfig(**common, sliding_window=6)
    if arch == "qwen2_window":  # layer 0 full, layer 1 sees the last 9 keys
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=9, max_window_layers=1)
    if arch == "qwen3_moe":  # layer 0 sparse, layer 1 dense; top-2 of 8 experts, weights not renormalized
        return transformers.Qwen3MoeConfig(**common, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                           moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1],
                                           norm_topk_prob=False)
    if arch == "gpt_oss":  # sliding (8 keys), full, sliding; top-2 of 4 experts; YaRN 32x over 64 positions
        return transformers.GptOssConfig(**{**common, "num_hidden_layers": 3, "max_position_embeddings": 2048,
                                            "intermediate_size": 32}, head_dim=16, num_local_experts=4,
                                         num_experts_per_tok=2, sliding_window=8,
                                         rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0,
                                                          "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                          "truncate": False, "original_max_position_embeddings": 64})
    if arch == "mixtral":  # top-2 of 4 experts, renormalized
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch.startswith("deepseek"):  # MLA; 3 layers, the first dense; top-2 of 8 experts in 4 groups + 1 shared
        mla = dict(common, num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=32,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
                   n_shared_experts=1, moe_intermediate_size=16, n_group=4, topk_group=2)
        if arch == "deepseek_v3":  # sigmoid scores with a correction bias, renormalized; YaRN with both mscales
            return transformers.DeepseekV3Config(**mla, q_lora_rank=24, norm_topk_prob=True, routed_scaling_factor=2.5,
                                                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                  "factor": 4.0,
                                                                  "original_max_position_embeddings": 256,
                                                                  "mscale": 1.0, "mscale_all_dim": 0.8})
        if arch == "deepseek_v2":  # q_proj; group-limited softmax top-k, scaled
            return transformers.DeepseekV2Config(**mla, q_lora_rank=None, topk_method="group_limited_greedy",
                                                 routed_scaling_factor=1.5)
        return transformers.DeepseekV2Config(**mla, q_lora_rank=24)  # q_a/q_b, plain softmax top-k
    return transformers.Qwen3Config(**common, head_dim=32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Callable[[str], str]:
    """A factory: architecture name -> a HF-format directory with random float32 weights and a tokenizer."""
    import torch
    import transformers

    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            torch.manual_seed(0)
            config = _tiny_config(arch)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            if arch == "gpt_oss":  # HF starts the experts' biases at 0 and the sinks near it: make them count
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if name.endswith(("_proj_bias", ".sinks")):
                            param.normal_(0.5 if name.endswith(".sinks") else 0.0, 1.0)
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):  # HF starts it at zero; let it change the choice
                    buffer.uniform_(-0.3, 0.3)
            model.save_pretrained(path)
            smol_tokenizer.save_pretrained(path)
            with open(path / "config.json") as f:
                assert json.load(f)["vocab_size"] == 49152
            made[arch] = str(path)
        return made[arch]

    return make


@pytest.fixture
def assert_pool_free() -> Callable:
    """Checks that after generate() returns every KV block is free again and the pool is consistent."""

    def check(llm) -> None:
        scheduler = llm.llm_engine.core.scheduler
        scheduler.check_integrity()
        assert not scheduler.has_unfinished_requests()
        assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks

    return check


RELIABILITY_RESULTS_ENV = "TOKENMILL_RELIABILITY_RESULTS"


@pytest.fixture(scope="session")
def reliability_results(tmp_path_factory) -> Path:
    """Where reliability tests record their numbers, for tools/reliability_report.py (docs/reliability.md):
    $TOKENMILL_RELIABILITY_RESULTS, else a temporary folder, so the recording runs (and can break) in every
    test run, not only when the doc is regenerated."""
    folder = Path(os.environ.get(RELIABILITY_RESULTS_ENV) or tmp_path_factory.mktemp("reliability"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def record_reliability(reliability_results, request) -> Callable[..., None]:
    """record(attack, clients=, requests=, bodies=, lost_requests=, server_errors=, kv_leaked=, **more) writes
    this test's numbers as one JSON file. Tests record what they measured before asserting on it, so a
    failing run leaves its real numbers behind."""

    def record(attack: str, **numbers: float | int | str | None) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
        path = reliability_results / f"{request.module.__name__.rsplit('.', 1)[-1]}-{name}.json"
        record = {"attack": attack, "test": request.node.nodeid, "recorded": time.time(), **numbers}
        path.write_text(json.dumps(record, indent=1) + "\n")

    return record
