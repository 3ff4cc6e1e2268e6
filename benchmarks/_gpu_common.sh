# Shared by the GPU scripts (gpu_round.sh, gpu_variants.sh); sourced, not run.
#   help_or_usage "$1": --help prints the calling script's header comment (exit 0); another option is a
#   usage error (exit 2); anything else (an OUT_DIR or nothing) goes on
#   require_cuda NAME: exit 2 where torch ($py) sees no CUDA device, before anything is written
#   part SECONDS TITLE COMMAND...: run with a time limit, print and log ($log) all it prints, and go on
#   whatever it returns (one part that hangs or fails cannot take the others with it)
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # run rather than sourced (--help or not): say what this file is
  sed -n '1,/^if /p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
help_or_usage() {
  case "$1" in
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "usage: bash $0 [OUT_DIR]   (--help for what it runs)" >&2; exit 2 ;;
  esac
}
require_cuda() {
  if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "$1: torch ($py) sees no CUDA device here; this script measures a GPU" >&2
    exit 2
  fi
}
part() {
  local limit=$1 title=$2
  shift 2
  local t0=$SECONDS
  echo "=== $title (limit ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $title: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}
