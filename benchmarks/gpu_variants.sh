#!/usr/bin/env bash
# Triton kernel variants that wait for a GPU, measured against the kernels as they are, in one run
# of under 10 minutes.  Each benchmarks/gpu_variants/NAME.patch is a change to hf_am that has been
# checked in Triton's interpreter on CPU only (the kernels' arithmetic may not land untested on a
# GPU); round 10 found AM-AdamW's kernels at 2.4-2.5x fused AdamW at 404M and 1B parameters, where
# round 5 had 1.56x at 404M, and these are the suspects.  For the tree as it is ("main") and for
# every patch, applied to a copy of the tree:
#   1. the kernel tests on the GPU (tests/gpu/test_cuda.py: Triton against the reference path, no
#      host sync, merged groups, and the variant's own tests), then
#   2. optimizer_overhead.py at 404M and 1B float32 parameters, where the device sets the step time:
#      AM-AdamW (tensor scope) against AdamW(fused=True) in the same process.
# Run from the repository root on a machine with one CUDA device (torch, transformers, pytest and
# matplotlib installed):
#
#     bash benchmarks/gpu_variants.sh [OUT_DIR]        # default: benchmarks/results/gpu_variants
#
# Files written (at most seven): run.log (everything printed), and variant_NAME.md/.png per variant
# (main included).  A patch that no longer applies is reported and skipped: make it again from its
# branch with `git diff main BRANCH > benchmarks/gpu_variants/NAME.patch`
# (tests/unit/test_benchmarks_smoke.py checks that every patch applies).
set -uo pipefail
source "$(dirname "$0")/_gpu_common.sh"
help_or_usage "${1:-}"
cd "$(dirname "$0")/.."
root=$PWD
out=${1:-benchmarks/results/gpu_variants}
py=${PYTHON:-python3}
require_cuda gpu_variants.sh
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/run.log"
: > "$log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
run_variant() {  # run_variant NAME DIR: the GPU kernel tests and the 404M/1B kernel table of the tree in DIR
  local name=$1 dir=$2
  part 150 "$name: GPU kernel tests" env PYTHONPATH="$dir" "$py" -m pytest "$dir/tests/gpu/test_cuda.py" -q \
    -p no:cacheprovider -o addopts="" --rootdir "$dir"
  part 150 "$name: kernels at 404M and 1B, float32" env PYTHONPATH="$dir" "$py" "$dir/benchmarks/optimizer_overhead.py" \
    --device cuda --dtype float32 --sizes 400 1000 --only AdamW --exclude ", foreach" "two calls" model \
    --repeats 20 --rounds 3 --markdown "$out/variant_$name.md"
}
part 20 machine bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $py -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)'"
run_variant main "$root"
for patch_file in benchmarks/gpu_variants/*.patch; do
  name=$(basename "$patch_file" .patch)
  dir="$work/$name"
  mkdir -p "$dir"
  cp -r hf_am tests benchmarks recipes pyproject.toml "$dir"/
  if ! patch -s -p1 -d "$dir" < "$patch_file" 2>&1 | tee -a "$log"; then
    echo "=== $name: the patch does not apply to this tree; skipped" | tee -a "$log"
    continue
  fi
  run_variant "$name" "$dir"
done
echo "=== done after ${SECONDS}s" | tee -a "$log"
