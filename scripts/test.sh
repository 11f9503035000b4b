#!/usr/bin/env bash
# The one test command: set up .venv with the test extra, then run pytest (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS=cpu
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"; exit 1
fi
exit "$rc"
