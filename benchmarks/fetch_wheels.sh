#!/usr/bin/env bash
# Wheels the GPU machine lacks for the HTTP server (fastapi, uvicorn and what they need beyond its own
# packages) and for structured output (llguidance), for Python 3.12 x86-64, into .whl/ (git-ignored); carry
# `.whl` in the device call.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# the versions the tests ran with here (pydantic pins its pydantic_core exactly), else the newest
SPECS=$("$PY" -c '
from importlib import metadata
for name in ("fastapi", "starlette", "pydantic", "pydantic_core", "uvicorn", "annotated-types",
             "typing-inspection", "opentelemetry-api", "llguidance"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
')
# shellcheck disable=SC2086
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    -d .whl $SPECS
ls .whl
