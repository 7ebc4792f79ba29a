#!/usr/bin/env bash
# Train on one machine with torchrun: one process per GPU, or 2 on a machine without GPUs.
#
#   launch/torchrun.sh                                   # configs/flickr8k.yaml
#   CONFIG=configs/demo-cifar10.yaml NPROC=2 launch/torchrun.sh train.epochs=3 run.dir=runs/try
#   DRY_RUN=1 launch/torchrun.sh                          # check the config, print what would run
#
# SIGTERM to torchrun reaches every trainer: they checkpoint and exit 75; rerun to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/flickr8k.yaml}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${NPROC:-}" ]; then  # one process per GPU, else 2 (importing torch to count costs seconds: only when asked)
  GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  NPROC=$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m trainer --config "$CONFIG" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  "$PYTHON" -m trainer --check --dry-run --world-size "$NPROC" --config "$CONFIG" "$@" || exit $?
  echo "would run: $PYTHON -m trainer --check --world-size $NPROC --config $CONFIG $*"
  echo "would run: ${CMD[*]}"
  exit 0
fi
"$PYTHON" -m trainer --check --world-size "$NPROC" --config "$CONFIG" "$@"
exec "${CMD[@]}"
