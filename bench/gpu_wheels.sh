#!/usr/bin/env bash
# Download the small wheels bench/gpu_check.py needs on a GPU machine without internet (not torch or
# torchvision, which such machines carry) into a gitignored folder, for bench/gpu_device_run.sh.
#
#   bash bench/gpu_wheels.sh                 # -> bench/wheels/, for CPython 3.10-3.13 on x86_64 Linux
#   PYVERS="3.12" bash bench/gpu_wheels.sh   # only the Python the GPU machine runs
#
# Versions are the ones installed in this checkout's .venv when it has them (known to work with this
# code), else the newest. Binary wheels (regex, pyyaml, ...) are fetched once per Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-bench/wheels}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PYVERS="${PYVERS:-3.10 3.11 3.12 3.13}"
mkdir -p "$DEST"
specs=()
while read -r dist module; do
  case "$dist" in ''|'#'*) continue ;; esac
  ver=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist" 2>/dev/null || true)
  specs+=("${dist}${ver:+==$ver}")
done < bench/gpu_deps.txt
for v in $PYVERS; do
  for spec in "${specs[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
      --python-version "$v" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform linux_x86_64 "$spec" \
      || echo "gpu_wheels: no wheel of $spec for Python $v (fine if that Python does not need it)" >&2
  done
done
du -sh "$DEST"
ls "$DEST" | wc -l | xargs echo "wheels in $DEST:"
