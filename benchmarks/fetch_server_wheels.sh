#!/usr/bin/env bash
# Downloads the server's dependencies that the GPU machine's image lacks (Python 3.12, x86-64) into
# .whl/ (git-ignored), for the device tool: run(carry=[".whl"], command="python3 -m pip install -q
# --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && ...").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl fastapi starlette pydantic pydantic-core uvicorn annotated-types typing-inspection annotated-doc
ls -la .whl
