#!/usr/bin/env bash
# Stop the local Slurm that tests/slurm/start.sh started (only the daemons whose pid files it wrote).
DIR=${CLIP_SLURM_DIR:-/tmp/clip-harness-slurm}
export SLURM_CONF=$DIR/slurm.conf
# Cancel what is still queued or running first: killing the daemons alone leaves job steps behind
# (proctrack/linuxproc) and, without `slurmctld -c` on the next start, the jobs themselves.
if [ -f "$SLURM_CONF" ] && scontrol ping 2>/dev/null | grep -q UP; then
  scancel --full --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 40); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
fi
for pidfile in "$DIR"/slurmd-node1.pid "$DIR"/slurmd-node2.pid "$DIR"/slurmctld.pid; do
  if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$pidfile"
  fi
done
echo "local Slurm stopped"
