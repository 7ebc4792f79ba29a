#!/usr/bin/env bash
# Train on one machine with torchrun: one process per GPU, or 2 on a machine without GPUs.
#
#   launch/torchrun.sh                                   # configs/flickr8k.yaml
#   CONFIG=configs/demo-cifar10.yaml NPROC=2 launch/torchrun.sh train.epochs=3 run.dir=runs/try
#   DRY_RUN=1 launch/torchrun.sh                          # check the config, print what would run
#   MAX_RESTARTS=0 launch/torchrun.sh …                   # fail at the first hang or crash
#
# A job that hangs (the trainers' watchdog: every rank's stacks in the log, exit 124) or crashes is
# restarted by torchrun itself, up to MAX_RESTARTS times (default 3), and resumes from its newest
# complete checkpoint (resume=auto); a restart that would fail at the same step as the last two stops
# with one line. The last line this script prints is the job's outcome, and its exit status the job's:
# 0 finished, 124 hung, 75 preempted, 2 bad input, 1 crashed.
# SIGTERM (or Ctrl-C) reaches every trainer: they checkpoint and exit 75, not restarted; rerun to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/flickr8k.yaml}
MAX_RESTARTS=${MAX_RESTARTS:-3}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${NPROC:-}" ]; then  # one process per GPU, else 2 (importing torch to count costs seconds: only when asked)
  GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  NPROC=$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A fresh rendezvous store for each of torchrun's restarts: with the store it shares across them (its
# default since torch 2.5) the restarted ranks read the previous attempt's addresses and gloo fails to
# connect ("connectFullMesh failed … Connection refused"): 7 of 11 restarts here with torch 2.14.1,
# 0 of 11 with this set (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Names this launch in the run folder's record of attempts (trainer/attempts.py): torchrun --standalone
# draws its own run id inside itself, where this script cannot read it.
export CLIP_LAUNCH_ID=${CLIP_LAUNCH_ID:-torchrun-$(date +%Y%m%d-%H%M%S)-$$}
CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS"
  -m trainer --config "$CONFIG" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  "$PYTHON" -m trainer --check --dry-run --world-size "$NPROC" --config "$CONFIG" "$@" || exit $?
  echo "would run: $PYTHON -m trainer --check --world-size $NPROC --config $CONFIG $*"
  echo "would run: ${CMD[*]}"
  exit 0
fi
"$PYTHON" -m trainer --check --world-size "$NPROC" --config "$CONFIG" "$@"

# torchrun in the background, so that a TERM sent to this script reaches it (bash runs traps only
# between commands; `wait` returns for them), with Ctrl-C's SIGINT not ignored as bash does for `&`
# (the terminal sends it to torchrun and the trainers themselves; this script only waits for them).
( trap - INT; exec "${CMD[@]}" ) &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM HUP
trap ':' INT
set +e
while :; do
  wait "$pid"
  code=$?
  kill -0 "$pid" 2>/dev/null || break
done
trap - TERM HUP INT
if [ "$code" = 0 ]; then
  exit 0
fi
# torchrun exits 1 whatever failed: the record of attempts says what, and gives the job's status.
exec "$PYTHON" -m trainer.attempts --config "$CONFIG" "$@"
