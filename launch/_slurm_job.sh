#!/usr/bin/env bash
# The body of launch/flickr8k.sbatch and launch/cifar10.sbatch (they set CONFIG and exec this).
# One Slurm task per GPU: srun starts the trainer once per GPU on every node, and the trainer takes
# its rank from SLURM_PROCID (plumbing/dist.py). Rendezvous at the first node of the allocation.
#
# Environment overrides:
#   CONFIG=configs/…yaml   the training config          RUN_NAME=name   → run.dir=runs/<name> (default: the config's)
#   OVERRIDES="k=v k=v"    extra config overrides         PROCS_PER_NODE  trainer processes per node
#   PYTHON=…               interpreter (default .venv/bin/python, else python3)
#   DRY_RUN=1              check the config and every override (as the run would), print what would run
#
# The ranks find each other at the first node of the step, on a port derived from the job id:
# plumbing/dist.py (`rendezvous`) is the one place that knows how.
#
# Preemption: Slurm sends USR1 to this shell (#SBATCH --signal=B:USR1@…) ahead of the time limit,
# and scancel/preemption send TERM. The trap hands the signal to srun, which forwards it to every
# trainer; they finish the current step, checkpoint, and exit 75. This script then requeues the job
# (#SBATCH --requeue), and the rerun resumes from that checkpoint (resume=auto).
#
# Failures: a job that hung (the trainers' watchdog printed every live rank's stacks and exited 124;
# srun --kill-on-bad-exit then kills the ranks that could not, a stopped one on another node included)
# or crashed is requeued too, up to MAX_RESTARTS times (default 3; preemptions do not count), and
# resumes the same way; when the same step failed twice in a row it stops with one line. The job's
# exit code and last line say how it ended (trainer/attempts.py: 0 finished, 124 hung, 1 crashed).
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"

CONFIG=${CONFIG:?set CONFIG}
RUN_NAME=${RUN_NAME:-}
if [ -n "$RUN_NAME" ] && ! [[ "$RUN_NAME" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]]; then
  echo "RUN_NAME=$RUN_NAME: use letters, digits, '.', '_' and '-' (it names runs/<RUN_NAME>)" >&2
  exit 2
fi
OVERRIDES=${OVERRIDES:-}
MAX_RESTARTS=${MAX_RESTARTS:-3}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NODES=${SLURM_JOB_NUM_NODES:-1}
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}}
PROCS_PER_NODE=${PROCS_PER_NODE%%(*}  # "2(x2)" → 2
WORLD=$((NODES * PROCS_PER_NODE))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# shellcheck disable=SC2206  # OVERRIDES is a list of key=value words
ARGS=(--config "$CONFIG" ${RUN_NAME:+"run.dir=runs/$RUN_NAME"} $OVERRIDES)
SRUN=(srun --nodes="$NODES" --ntasks-per-node="$PROCS_PER_NODE" --kill-on-bad-exit=1 "$PYTHON" -m trainer "${ARGS[@]}")

RENDEZVOUS=$("$PYTHON" -m plumbing.dist 2>/dev/null || echo "unknown")
echo "job ${SLURM_JOB_ID:-none} on ${SLURM_JOB_NODELIST:-no allocation}: $NODES nodes × $PROCS_PER_NODE processes = world size $WORLD; rendezvous $RENDEZVOUS; SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
if [ -n "${DRY_RUN:-}" ]; then
  # The config and every override, checked exactly as the run checks them (data not there yet is noted).
  "$PYTHON" -m trainer --check --dry-run --world-size "$WORLD" --ranks-per-node "$PROCS_PER_NODE" "${ARGS[@]}" || exit $?
  echo "would run: $PYTHON -m trainer --check --world-size $WORLD --ranks-per-node $PROCS_PER_NODE ${ARGS[*]}"
  echo "would run: ${SRUN[*]}"
  exit 0
fi

# Everything a run needs, checked once here: a bad config or shard layout is one line, not N tracebacks;
# and the memory plan of each rank against this node's (each GPU's) memory, before the job waits.
"$PYTHON" -m trainer --check --world-size "$WORLD" --ranks-per-node "$PROCS_PER_NODE" "${ARGS[@]}" || exit $?

signalled=""
forward() {
  signalled=$1
  echo "$(date +%T) batch script got $1: asking the trainers to checkpoint"
  kill -USR1 "$pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${SRUN[@]}" &
pid=$!
while :; do  # `wait` returns early when a trapped signal arrives: wait again for srun itself
  wait "$pid"
  code=$?
  kill -0 "$pid" 2>/dev/null || break
done
echo "$(date +%T) trainers exited with $code"

# After a forwarded signal the trainers exit 75 once their checkpoint is written (srun may report
# 143: --kill-on-bad-exit terminates the ranks still tearing down). Anything but a finished run (0)
# goes back to the queue; the rerun resumes from the newest complete checkpoint.
if [ -n "$signalled" ] && [ "$code" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "$(date +%T) stopped after $signalled: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
[ "$code" = 0 ] && exit 0
# A hang or a crash: back to the queue while restarts are left and the failures move on (the record
# of attempts in the run folder says which), else the job's outcome in one line and its status.
if [ -n "${SLURM_JOB_ID:-}" ] && "$PYTHON" -m trainer.attempts --restart "$MAX_RESTARTS" "${ARGS[@]}"; then
  echo "$(date +%T) requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exec "$PYTHON" -m trainer.attempts "${ARGS[@]}"
