#!/usr/bin/env bash
# The device check of packed ternary inference on one GPU (< 8 min), from the repository root:
#   bash benchmarks/device_check.sh [device_check.py flags, e.g. --sections decode]
# The GPU image has jax, flax, optax, chex and absl; ec2t_jax also needs `constriction`, carried
# as a wheel in .whl/ (made once on a machine with pip, Python 3.12 there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl constriction==0.5.0
# then run with .whl carried. The table is printed and written to $OUT (or /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-/tmp}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 $PY benchmarks/device_check.py --json "$DEST/device_check.json" "$@" 2>&1 \
  | grep -v "^[IW][0-9]\{4\} " | tee "$DEST/device_check.log"
