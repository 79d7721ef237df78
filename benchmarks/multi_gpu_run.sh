#!/usr/bin/env bash
# The runs over several GPUs of one host (issue 21's layouts), for a device call on a multi-GPU kind:
#   TOKENMILL_COMMIT=<sha> bash benchmarks/multi_gpu_run.sh [correctness] [tp] [pp] [70b] [ep]
# correctness: greedy tokens of TP=2, PP=2 and TP=2 x PP=2 equal one GPU's on a random-weight Llama (NCCL);
# tp / pp: nano throughput and batch-1 latency of dummy Llama-3.1-8B at TP=2,4,8 (as many as the host has) and
# PP=2, 4; 70b: dummy Llama-3.1-70B at TP=2/4/8 and TP=4 x PP=2; ep: a server of dummy Qwen3-30B-A3B with its
# experts over every GPU, as TP x EP and as DP x EP (cores exchanging tokens all-to-all), driven by bench serve
# (needs the wheels of fetch_server_wheels.sh carried as .whl). JSONs land in $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENMILL_COMMIT=${TOKENMILL_COMMIT:?set TOKENMILL_COMMIT to the commit under test}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TM="python3 -m tokenmill.entrypoints.cli"
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
STEPS=" ${*:-correctness tp pp} "
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
want() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if want correctness; then
  python3 - <<'PY' 2>&1 | tail -8
import json, os, tempfile, torch, transformers
from tokenmill import LLM, SamplingParams
config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
path = tempfile.mkdtemp()
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
prompts = [{"prompt_token_ids": list(range(10 + i, 200 + 7 * i))} for i in range(16)]
params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
result = {}
for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
    if tp * pp > torch.cuda.device_count():
        continue
    llm = LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, skip_tokenizer_init=True, dtype="float32",
              max_model_len=1024, gpu_memory_utilization=0.5)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.llm_engine.shutdown()
    result[f"tp{tp}-pp{pp}"] = tokens
for name, tokens in result.items():
    same = sum(a == b for x, y in zip(tokens, result["tp1-pp1"]) for a, b in zip(x, y)) / (16 * 64)
    print(f"{name}: {same:.1%} of greedy tokens equal to one GPU's")
json.dump({k: v for k, v in result.items()}, open(os.environ.get("OUT", "/tmp/out") + "/correctness.json", "w"))
PY
fi
run() {  # name, then bench flags
  local name=$1; shift
  timeout 300 $TM bench throughput --load-format dummy --workload nano "$@" --output-json "$OUT/nano-$name.json" 2>&1 | tail -2
  timeout 200 $TM bench latency --load-format dummy --input-len 128 --output-len 256 --num-iters 3 "$@" --output-json "$OUT/latency-$name.json" 2>&1 | tail -2
}
if want tp; then
  for tp in 2 4 8; do [ "$tp" -le "$GPUS" ] && run llama-3.1-8b-tp$tp --model llama-3.1-8b -tp $tp; done
fi
if want pp; then
  for pp in 2 4; do [ "$pp" -le "$GPUS" ] && run llama-3.1-8b-pp$pp --model llama-3.1-8b -pp $pp; done
fi
if want 70b; then
  for tp in 2 4 8; do [ "$tp" -le "$GPUS" ] && run llama-3.1-70b-tp$tp --model llama-3.1-70b -tp $tp; done
  [ 8 -le "$GPUS" ] && run llama-3.1-70b-tp4-pp2 --model llama-3.1-70b -tp 4 -pp 2
fi
if want ep; then
  QWEN=$(python3 -c "from tokenmill.entrypoints.cli.bench.presets import model_path; print(model_path('qwen3-30b-a3b'))")
  for layout in tp dp; do
    $TM serve "$QWEN" --load-format dummy --max-model-len 4096 --enable-expert-parallel -$layout $GPUS --port 8013 \
      --disable-uvicorn-access-log > "$OUT/serve-qwen3-30b-a3b-$layout$GPUS-ep.log" 2>&1 &
    for i in $(seq 1 150); do sleep 2; python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8013/health')" 2>/dev/null && break; done
    timeout 200 $TM bench serve --base-url http://127.0.0.1:8013 --num-prompts 512 --input-len 512 --output-len 256 \
      --request-rate inf --result-file "$OUT/serve-qwen3-30b-a3b-$layout$GPUS-ep.json" 2>&1 | tail -6
    kill %1; wait
  done
fi
# A device call returns at most 8 files: the JSONs and logs travel as one archive (tar -xzf results.tgz here).
(cd "$OUT" && ls *.json *.log > /tmp/packed 2>/dev/null; [ -s /tmp/packed ] && tar -czf results.tgz -T /tmp/packed \
  && xargs rm -f < /tmp/packed)
ls "$OUT"
