#!/usr/bin/env bash
# Start a real Slurm on this machine: one controller and two fake nodes (node1, node2), each
# advertising 4 CPUs and 4 fake GPUs. Idempotent: a running cluster started by this script is kept.
# Installs Debian's Slurm if it is missing (needs root and apt). Facts behind every setting:
# ../shared/notes/slurm-local.md. Prints the SLURM_CONF line that clients (sbatch, squeue) need.
#
#   bash tests/slurm/start.sh          # then: export SLURM_CONF=/tmp/clip-harness-slurm/slurm.conf
#   bash tests/slurm/stop.sh           # stops only what this script started
set -euo pipefail
DIR=${CLIP_SLURM_DIR:-/tmp/clip-harness-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

if [ "$(id -u)" != 0 ]; then
  echo "tests/slurm/start.sh: needs root (slurmd runs jobs as their users)" >&2
  exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  echo "installing Debian's Slurm (slurmctld slurmd slurm-client)…"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if running "$DIR/slurmctld.pid" && running "$DIR/slurmd-node1.pid" && running "$DIR/slurmd-node2.pid"; then
  echo "local Slurm already running (SLURM_CONF=$CONF)"
  exit 0
fi

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/gpus"
for i in 0 1 2 3; do ln -sf /dev/null "$DIR/gpus/fakegpu$i"; done
# torchrun/trainer rendezvous at node1: the fake node names must resolve (else a c10d timeout after ~170 s).
grep -qE '^127\.0\.0\.1[[:space:]].*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts

HOST=$(hostname)
cat > "$CONF" <<CONF
# Written by tests/slurm/start.sh: two fake nodes on one host, no cgroups, no accounting.
ClusterName=clipharness
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
GresTypes=gpu
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
NodeName=node1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=4 RealMemory=8000 Gres=gpu:4 State=UNKNOWN
NodeName=node2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=4 RealMemory=8000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
cat > "$DIR/gres.conf" <<GRES
Name=gpu File=$DIR/gpus/fakegpu[0-3]
GRES

# A restart needs every daemon to read the same slurm.conf: stop what an earlier start left.
bash "$(dirname "$0")/stop.sh" >/dev/null 2>&1 || true
slurmctld -c -f "$CONF"  # -c: start with an empty queue, never jobs left by an interrupted run
slurmd -N node1 -f "$CONF"
slurmd -N node2 -f "$CONF"

for _ in $(seq 1 60); do
  if [ "$(sinfo -h -o '%T' -N 2>/dev/null | grep -c -E '^(idle|mixed|allocated)')" = 2 ]; then
    echo "local Slurm up: node1 node2 idle (SLURM_CONF=$CONF)"
    exit 0
  fi
  scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
echo "tests/slurm/start.sh: nodes did not become idle; see $DIR/*.log" >&2
sinfo -N >&2 || true
exit 1
