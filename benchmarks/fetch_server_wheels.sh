#!/usr/bin/env bash
# Downloads the server's dependencies that the GPU machine's image lacks (Python 3.12, x86-64) into
# .whl/ (git-ignored), for the device tool: run(carry=[".whl"], command="python3 -m pip install -q
# --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && ...").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl fastapi starlette pydantic pydantic-core uvicorn annotated-types typing-inspection annotated-doc \
  xgrammar apache-tvm-ffi click h11 opentelemetry-api importlib-metadata zipp
# xgrammar's wheel carries a 31 MB static library that nothing imports: drop it (and its RECORD line).
python3 - .whl/xgrammar-*.whl <<'PY'
import sys, zipfile
path = sys.argv[1]
src = zipfile.ZipFile(path)
items = [(i, src.read(i.filename)) for i in src.infolist() if not i.filename.endswith(".a")]
src.close()
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not l.split(b",")[0].endswith(b".a"))
        out.writestr(info, data)
PY
ls -la .whl
