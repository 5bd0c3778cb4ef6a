#!/usr/bin/env bash
# Creates .venv and installs fastdpo with its test extras. Idempotent: a second run with an
# unchanged pyproject.toml does nothing. Without an NVIDIA GPU it installs torch's CPU build
# first, so the dependency range in pyproject.toml never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.fastdpo-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" torch==2.13.0
  fi
fi
"${pip[@]}" -e '.[test]'
echo "$want" >"$stamp"
