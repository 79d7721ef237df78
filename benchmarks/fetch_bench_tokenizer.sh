#!/usr/bin/env bash
# Copies the embedded model's tokenizer (converted from its GGUF and cached by tokenmill) into
# .bench-tokenizer/ (git-ignored), to carry to the GPU machine: random-weight benchmarks that need real
# text tokens (structured outputs) use it with --tokenizer .bench-tokenizer.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
python3 -c "
from tokenmill.source import load_tokenizer, resolve_model
load_tokenizer(resolve_model('default')).save_pretrained('.bench-tokenizer')
"
ls -la .bench-tokenizer
