#!/usr/bin/env bash
# Run bench/gpu_check.py on a GPU machine and leave its output in $OUT (default bench/out).
#
# Installs open_clip and the small packages it needs from a local wheel folder (bench/wheels, see
# bench/gpu_wheels.sh) into .gpu_deps inside the repository, only those the machine lacks; creates nothing
# outside the repository except under $OUT. The check runs under a time limit (GPU_CHECK_LIMIT seconds,
# default 480); arguments are passed to gpu_check.py (e.g. --quick).
#
#   bash bench/gpu_device_run.sh
#   GPU_CHECK_LIMIT=300 bash bench/gpu_device_run.sh --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
WHEELS="${WHEELS:-bench/wheels}"
DEPS="$PWD/.gpu_deps"
PY="${PYTHON:-python3}"
LIMIT="${GPU_CHECK_LIMIT:-480}"
mkdir -p "$OUT" "$DEPS"
LOG="$OUT/gpu_check.txt"
export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export MPLCONFIGDIR="$PWD/.gpu_bench/mpl" XDG_CACHE_HOME="$PWD/.gpu_bench/cache" TORCHINDUCTOR_CACHE_DIR="$PWD/.gpu_bench/inductor"

missing() {  # distributions from bench/gpu_deps.txt whose module does not import here
  while read -r dist module; do
    case "$dist" in ''|'#'*) continue ;; esac
    "$PY" -c "import $module" >/dev/null 2>&1 || echo "$dist"
  done < bench/gpu_deps.txt
}

{
  echo "== machine"
  nvidia-smi -L 2>&1 || true
  "$PY" -V
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  echo "cores $(nproc)"
  if ! "$PY" -c "import open_clip" >/dev/null 2>&1; then
    need=$(missing | tr '\n' ' ')
    echo "== installing from $WHEELS into .gpu_deps: $need"
    if [ -d "$WHEELS" ] && [ -n "$need" ]; then
      # shellcheck disable=SC2086
      "$PY" -m pip install --quiet --no-index --no-deps --target "$DEPS" --find-links "$WHEELS" $need 2>&1 | tail -5
      if ! "$PY" -c "import open_clip" >/dev/null 2>&1; then
        echo "== open_clip still fails to import; installing every listed wheel (shadowing the machine's)"
        all=$(grep -v '^#' bench/gpu_deps.txt | awk 'NF {print $1}' | tr '\n' ' ')
        # shellcheck disable=SC2086
        "$PY" -m pip install --quiet --no-index --no-deps --target "$DEPS" --find-links "$WHEELS" $all 2>&1 | tail -5
      fi
    else
      echo "no wheel folder $WHEELS: run bash bench/gpu_wheels.sh first and carry it"
    fi
  fi
  "$PY" -c "import open_clip; print('open_clip', open_clip.__version__)" 2>&1 | tail -3
  echo "== bench/gpu_check.py (limit ${LIMIT}s)"
  timeout --kill-after=20 "$LIMIT" "$PY" bench/gpu_check.py --json "$OUT/gpu_check.json" "$@"
  echo "== exit $?"
} 2>&1 | tee "$LOG"
