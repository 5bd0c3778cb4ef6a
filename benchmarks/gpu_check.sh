#!/usr/bin/env bash
# One validation run for a GPU window (the project's lent H200: 15 minutes, nothing reachable
# from it). In under 8 minutes it runs, writing one markdown report with device, versions, date
# and commit:
#   1. pytest -m gpu                           (the CUDA-only tests)
#   2. benchmarks/bench_linear_logprobs.py     at (N, H, V) = (16384, 4096, 128256) bf16, every
#                                              impl the script knows (the unavailable ones say why)
#   3. benchmarks/bench_forward.py             every attention backend of the packed forward
#
#   bash benchmarks/gpu_check.sh [--dry-run]
#
# --dry-run (automatic without CUDA) runs the same steps end to end on the CPU: it checks that
# the test selection collects and that both benchmarks accept the exact arguments, skips what
# needs CUDA, and says so in the report.
#
# Packages the GPU machine lacks (liger-kernel, cut-cross-entropy, trl, datasets, and a
# setuptools new enough to install fastdpo) travel as wheels: run `make gpu-wheels` beforehand
# on a machine with PyPI (it fills build/gpu-wheels/), carry that folder, and this script installs
# them with --no-index into a scratch folder. fastdpo itself is installed the same way when its
# python cannot import it yet.
#
# Environment: PYTHON (default python3), GPU_CHECK_OUT (default build/gpu-check; the report is
# $GPU_CHECK_OUT/gpu_check.md), GPU_CHECK_WHEELS (default build/gpu-wheels), and the step time
# limits GPU_CHECK_TEST_S / GPU_CHECK_HEAD_S / GPU_CHECK_FORWARD_S in seconds (150 / 150 / 120).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-build/gpu-check}
wheels=${GPU_CHECK_WHEELS:-build/gpu-wheels}
dry_run=0
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
report=$out/gpu_check.md
status=0
start=$(date +%s)

note() { echo "$*" | tee -a "$report"; }
section() { printf '\n## %s\n\n' "$*" | tee -a "$report"; }

# Step: name, time limit (s), command... Output goes to $out/<name>.log; the tail to the report.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  note "\`$*\`: exit $rc in $((SECONDS - t0)) s (limit $limit s; log $name.log)"
  [ "$rc" = 124 ] && note "**$name ran past its limit and was stopped.**"
  [ "$rc" = 0 ] || status=1
  return 0
}

: >"$report"
note "# fastdpo GPU check"
note ""
# Without .git (a copied working tree), the commit `make gpu-wheels` wrote beside the wheels.
note "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null ||
  cat "$wheels/COMMIT" 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null |
  grep -q . && echo ' (uncommitted changes)')"

# Wheels the GPU machine lacks, installed without an index into a scratch folder.
site=$out/site
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
    "$wheels"/*.whl || status=1
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$python" -c 'import fastdpo.kernels' 2>/dev/null; then
  # Editable, into the interpreter's own environment (the GPU machine's is thrown away after):
  # kernels/ is importable as fastdpo.kernels only through the install's mapping. Build
  # isolation finds setuptools among the wheels: nothing is fetched.
  "$python" -m pip install -q --no-index --find-links "$wheels" --no-deps -e . ||
    { echo "gpu_check: cannot install fastdpo: run \`make gpu-wheels\` on a machine with" \
      "PyPI and carry $wheels" >&2; exit 1; }
fi

section "Device and versions"
"$python" - <<'EOF' | tee -a "$report"
import importlib.metadata as metadata
import platform

import torch

if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"- device: {props.name}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
else:
    print(f"- device: no CUDA device ({platform.processor() or platform.machine()} CPU)")
print(f"- python {platform.python_version()}")
for name in ("torch", "triton", "transformers", "numpy", "fastdpo", "flash-attn",
             "liger-kernel", "cut-cross-entropy", "trl"):
    try:
        print(f"- {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"- {name}: not installed")
EOF
has_cuda=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$has_cuda" != 1 ] && [ "$dry_run" = 0 ]; then
  note ""
  note "No CUDA device: dry run (what needs CUDA is skipped)."
  dry_run=1
fi

# Dry run: the same scripts, flags and report path on the CPU, at a tiny size and with one
# impl each (the full list needs CUDA).
if [ "$dry_run" = 1 ]; then
  head_size=(--device cpu --shapes 64,32,256 --impls fastdpo-torch --warmup 1 --matmul-size 0)
  forward_size=(--device cpu --small --budgets 512 --impls packed-sdpa --warmup 1 --threads 1)
else
  head_size=(--device cuda --shapes 16384,4096,128256)
  forward_size=(--device cuda)
fi
head_args=(benchmarks/bench_linear_logprobs.py "${head_size[@]}" --dtype bf16 --rounds 1
  --repeats 5 --csv "$out/linear_logprobs.csv" --markdown "$out/linear_logprobs.md")
forward_args=(benchmarks/bench_forward.py "${forward_size[@]}" --rounds 1 --repeats 3
  --csv "$out/forward.csv" --markdown "$out/forward.md")

section "1. pytest -m gpu"
if [ "$dry_run" = 1 ]; then
  step pytest-gpu-collect 120 "$python" -m pytest -m gpu --collect-only -q -p no:cacheprovider
  note "Collected only; running them needs CUDA ($(grep -Eo '[0-9]+/[0-9]+ tests collected' \
    "$out/pytest-gpu-collect.log" || echo 'see the log'))."
else
  step pytest-gpu "${GPU_CHECK_TEST_S:-150}" "$python" -m pytest -m gpu -q -p no:cacheprovider
  note ""
  note '```text'
  tail -5 "$out/pytest-gpu.log" | tee -a "$report"
  note '```'
fi

section "2. The head at (16384, 4096, 128256) bf16, every impl"
[ "$dry_run" = 1 ] && note "Dry run: a CPU-sized shape and one impl (the GPU run needs CUDA)."
step head "${GPU_CHECK_HEAD_S:-150}" "$python" "${head_args[@]}"
if [ -f "$out/linear_logprobs.md" ]; then tee -a "$report" <"$out/linear_logprobs.md"; fi

section "3. The packed forward, every attention backend"
[ "$dry_run" = 1 ] && note "Dry run: the small model and one backend (the GPU run needs CUDA)."
step forward "${GPU_CHECK_FORWARD_S:-120}" "$python" "${forward_args[@]}"
if [ -f "$out/forward.md" ]; then tee -a "$report" <"$out/forward.md"; fi

section "Summary"
note "$(((($(date +%s) - start)))) s in all; $([ $status = 0 ] && echo 'every step exited 0' ||
  echo 'a step FAILED: see its log')$([ "$dry_run" = 1 ] && echo '; dry run')."
note "Report: $report"
exit $status
