#!/usr/bin/env bash
# Creates .venv-gpu-stack: fastdpo with its test extras on the GPU machine's software stack
# (the project's lent H200: Python 3.12, torch 2.11.0, triton 3.6.0, transformers 5.17.0,
# numpy 2.5.2, as read there in 2026-11), so CI runs the suite under both stacks.
#
# torch 2.11.0 from PyPI is its CUDA build (the nvidia-* wheels come with it, ~3 GB on disk);
# it imports and runs on a CPU-only machine, and brings triton 3.6.0, the GPU machine's. Needs
# Python 3.12 for numpy 2.5 (none is built for 3.11): PYTHON_GPU_STACK, else python3.12 on the
# PATH, else pyenv's newest 3.12; without one it falls back to python3 and the newest numpy
# that Python has, and says so.
#
# Idempotent like scripts/setup.sh: a second run with unchanged pyproject.toml and this script
# does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-gpu-stack
pins=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0
  huggingface-hub==1.33.0 safetensors==0.8.0 tokenizers==0.23.2)
numpy_pin=numpy==2.5.2

find_python() {
  if [ -n "${PYTHON_GPU_STACK:-}" ]; then
    echo "$PYTHON_GPU_STACK"
    return
  fi
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c '' 2>/dev/null; then
    command -v python3.12
    return
  fi
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  local found
  found=$(ls -d "$root"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$found" ]; then
    echo "$found"
    return
  fi
  echo python3
}

stamp=$venv/.fastdpo-installed
want=$(cat pyproject.toml scripts/setup_gpu_stack.sh | sha256sum | cut -d' ' -f1)
if [ -x $venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if [ ! -x $venv/bin/python ]; then
  python=$(find_python)
  "$python" -m venv $venv
fi
if ! $venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  numpy_pin=numpy
  echo "setup_gpu_stack: $($venv/bin/python -V) has no numpy 2.5 (the GPU machine's 2.5.2):" \
    "installing the newest numpy it has; set PYTHON_GPU_STACK to a Python 3.12 for the exact" \
    "stack (rm -r $venv first)" >&2
fi
# The pins go in as constraints too, so the test extras (accelerate, peft, ...) cannot move them.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "${pins[@]}" "$numpy_pin" | grep '==' >"$constraints"
pip=($venv/bin/python -m pip install --disable-pip-version-check -q -c "$constraints")
"${pip[@]}" "${pins[@]}" "$numpy_pin"
"${pip[@]}" -e '.[test]'
$venv/bin/python - <<'EOF'
import sys

import numpy, torch, transformers, triton

print(
    f"setup_gpu_stack: python {sys.version.split()[0]}, torch {torch.__version__}, "
    f"triton {triton.__version__}, transformers {transformers.__version__}, "
    f"numpy {numpy.__version__}"
)
EOF
echo "$want" >"$stamp"
