#!/usr/bin/env bash
# The main job: set up .venv, then serve the embedded tiny default model with demo adapters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/slora-jax serve "$@"
