#!/usr/bin/env bash
# One device call comparing two trees of this repo on the same GPU, workload by workload (A, then B, then
# the next workload), so drift of the machine affects both alike. Each step is one of device_run.sh's.
# Usage (device tool, repo root; TREE_A and TREE_B are checkouts carried beside the working tree, e.g. a
# `git archive` of the older commit in an ignored folder named in `carry`):
#   COMMIT_A=<sha> COMMIT_B=<sha> bash benchmarks/device_ab.sh TREE_A TREE_B step [step ...]
# The JSONs (a/, b/) and logs come back as one archive, $OUT/ab.tgz (the device returns at most 8 files);
# a table of both is printed last.
set -u
OUT=${OUT:-/tmp/out}; WORK=/tmp/ab; mkdir -p "$OUT" "$WORK"
TREE_A=$(cd "$1" && pwd); TREE_B=$(cd "$2" && pwd); shift 2
# device_run.sh installs the wheels of its tree's .whl/ (benchmarks/fetch_server_wheels.sh): share B's.
for tree in "$TREE_A" "$TREE_B"; do [ -e "$tree/.whl" ] || ln -s "$PWD/.whl" "$tree/.whl" 2>/dev/null; done
for step in "$@"; do
  for side in a b; do
    tree=$([ $side = a ] && echo "$TREE_A" || echo "$TREE_B")
    commit=$([ $side = a ] && echo "${COMMIT_A:?}" || echo "${COMMIT_B:?}")
    echo "== $side ($commit): $step"
    (cd "$tree" && OUT="$WORK/$side" TOKENMILL_COMMIT=$commit bash benchmarks/device_run.sh "$step" > "$WORK/$side-$step.log" 2>&1)
  done
done
tar czf "$OUT/ab.tgz" -C "$WORK" .
python3 - "$WORK" <<'PY'
import glob, json, os, sys
rows = {}
for side in "ab":
    for path in sorted(glob.glob(f"{sys.argv[1]}/{side}/*.json")):
        for r in json.load(open(path)):
            key = (os.path.basename(path), r["model"])
            for metric in ("output_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "startup_to_first_token_s"):
                if metric in r:
                    rows.setdefault((*key, metric), {})[side] = r[metric]
print(f"{'result':<40} {'metric':<26} {'A':>10} {'B':>10} {'B/A':>7}")
for (name, model, metric), v in sorted(rows.items()):
    a, b = v.get("a"), v.get("b")
    ratio = f"{b / a:7.3f}" if a and b else ""
    print(f"{name:<40} {metric:<26} {a or float('nan'):10.1f} {b or float('nan'):10.1f} {ratio}")
PY
