#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: make ./.venv (if missing) and install flexgen-helm into it (if it is
# not installed yet, or pyproject.toml / setup.cfg / install.sh changed since), then activate it.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    echo "Creating the virtual environment .venv ..."
    python3 -m venv .venv
fi
source .venv/bin/activate
stamp=.venv/.flexgen-helm-installed
wanted=$(cat pyproject.toml setup.cfg scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "Installing flexgen-helm and its dependencies into .venv (CPU torch 2.13.0; a few minutes) ..."
    python -m pip install -q --upgrade pip
    bash scripts/install.sh
    echo "$wanted" > "$stamp"
fi
