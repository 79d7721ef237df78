"""Speculation's dynamic draft length on the CPU, the embedded model, n-gram drafts: output tokens/s of greedy
decoding without speculation, with n-gram (k = 3), and with n-gram under the acceptance-rate policy
(spec_decode/draft_policy.py), on prompts whose continuations repeat them (where n-gram drafts are accepted)
and on prompts whose continuations do not, after a warm-up generate; the acceptance rate is printed beside
the speed. The configurations are measured in turn, round after round, and each one's median is reported.

    OMP_NUM_THREADS=1 python benchmarks/spec_dynamic_bench.py --max-tokens 48 --rounds 3 \
        --output-json benchmarks/results/cpu-<date>/spec_dynamic.json

Run from the repository root. On a shared CPU, one thread: with two, a busy neighbour made the same run swing
between 3 and 33 tok/s. Compare figures of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.entrypoints.cli.bench.common import base_record, write_records  # noqa: E402

REPEATING = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n\ndef",
    "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3,",
    "<li>apple</li>\n<li>banana</li>\n<li>cherry</li>\n<li>",
    "The cat sat on the mat. The dog sat on the log. The cat sat on the",
]
FREE = [
    "Write a short poem about the sea at night.",
    "Explain why the sky is blue to a child.",
    "List three ideas for a weekend trip.",
    "What makes a good cup of coffee?",
]
CONFIGS = {
    "none": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "ngram+policy": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4,
                     "disable_by_acceptance_rate": 0.3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engines = {name: LLM(speculative_config=spec, max_model_len=512) for name, spec in CONFIGS.items()}
    for llm in engines.values():
        llm.generate(REPEATING[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    speeds: dict[tuple[str, str], list[float]] = {}
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    for _ in range(args.rounds):  # interleaved, so that a busy moment of the machine hits every configuration
        for prompts_name, prompts in (("repeating", REPEATING), ("free", FREE)):
            for name, llm in engines.items():
                before = llm.get_metrics()
                started = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                elapsed = time.perf_counter() - started
                after = llm.get_metrics()
                speeds.setdefault((name, prompts_name), []).append(
                    sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
                counts[name, prompts_name] = tuple(after[key] - before[key] for key in (
                    "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"))
    results = []
    for (name, prompts_name), values in speeds.items():
        drafts, accepted = counts[name, prompts_name]
        rate = f"{accepted / drafts:.2f}" if drafts else "-"
        print(f"{name:13s} {prompts_name:10s} median {statistics.median(values):6.1f} tok/s "
              f"(of {', '.join(f'{v:.1f}' for v in values)})  drafts {drafts:4d}  acceptance {rate}")
        results.append({"config": name, "prompts": prompts_name, "median_tok_s": statistics.median(values),
                        "rounds_tok_s": values, "draft_tokens": drafts, "accepted_tokens": accepted})
    write_records({"workload": "spec-dynamic-draft-length", "model": "SmolLM2-135M-Instruct (embedded)",
                   "configs": CONFIGS, "results": results, "peer": "the same engine without speculation",
                   **base_record(), "command": "python benchmarks/spec_dynamic_bench.py " + " ".join(sys.argv[1:])},
                  args.output_json)


if __name__ == "__main__":
    main()
