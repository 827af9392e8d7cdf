#!/usr/bin/env bash
# Install flexgen-helm with its test and benchmark extras into the active Python environment.
#  - torch 2.13.0 first: its CPU build (an unpinned torch pulls several GB of CUDA packages);
#  - a constraint keeps every later requirement on that torch;
#  - crfm-helm pulls torchvision, whose wheel breaks transformers' imports on the CPU torch and is
#    only used by HELM's image scenarios, so it is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=$(mktemp)
echo "torch==2.13.0" > "$constraints"
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c "$constraints" -e ".[test,bench]"
python -m pip uninstall -q -y torchvision || true
python -c "from transformers import OPTForCausalLM; import helm, cvxpy, flexgen_core" 
rm -f "$constraints"
