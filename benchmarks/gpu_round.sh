#!/usr/bin/env bash
# One GPU round in under 10 minutes: the GPU tests first, then every GPU figure that
# benchmarks/RESULTS.md reports.  Run from the repository root on a machine with one CUDA
# device and torch, transformers, accelerate, pytest, matplotlib installed:
#
#     bash benchmarks/gpu_round.sh [OUT_DIR]        # default: benchmarks/results/gpu_round
#
# Each part has its own time limit, so that one that hangs cannot take the others with it;
# everything printed goes to OUT_DIR/run.log as well.  Files written (at most eight):
#   run.log                                    all output, the GPU tests' included
#   h200_float32.md/.png, h200_bfloat16.md/.png    optimizer_overhead.py at 25M, 100M, 400M, 1B
#   trainer_overhead_gpu_60m_bf16.md/.png     the Trainer, llama_60m in bf16, 200 timed steps per run
#   gpu_step_anatomy.md                        host/device ms and device ops per step; CUDA-graph replays
# and, in run.log only, step_profile.py on the GPU: the host time and torch ops of each part of a step.
# (The names say h200 because that is the machine this project is lent; the files name the GPU
# they ran on in their first lines.)
set -uo pipefail
source "$(dirname "$0")/_gpu_common.sh"
help_or_usage "${1:-}"
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu_round}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
require_cuda gpu_round.sh
mkdir -p "$out"
log="$out/run.log"
: > "$log"
part 20 machine bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $py -c 'import torch, triton, transformers, accelerate; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__, \"accelerate\", accelerate.__version__)'; git log --oneline -1 2>/dev/null || true"
part 180 "GPU tests" "$py" -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" -rs
common=(--only AdamW --exclude ", foreach" "two calls" --repeats 20 --rounds 3)
part 90 "kernels float32" "$py" benchmarks/optimizer_overhead.py --device cuda --dtype float32 --sizes 25 100 400 1000 \
  "${common[@]}" --markdown "$out/h200_float32.md"
part 80 "kernels bfloat16" "$py" benchmarks/optimizer_overhead.py --device cuda --dtype bfloat16 --sizes 25 100 400 1000 \
  "${common[@]}" --markdown "$out/h200_bfloat16.md"
part 120 "Trainer 60m bf16" "$py" benchmarks/trainer_overhead.py --device cuda --bf16 --sizes 60m --fused --pairs 2 \
  --steps 200 --warmup 10 --batch-size 64 --seq-len 256 --out-dir "$out" --tag gpu_60m_bf16
part 60 "step anatomy and CUDA-graph replays" "$py" benchmarks/gpu_step_anatomy.py --sizes 25 100 --graph --out "$out/gpu_step_anatomy.md"
part 60 "host parts of a step" "$py" benchmarks/step_profile.py --device cuda --sizes tiny small w512 --steps 50
echo "=== done after ${SECONDS}s" | tee -a "$log"
