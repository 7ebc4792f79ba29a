# Sourced by the sbatch scripts whose work a rerun finishes by itself (sample.sbatch, prep.sbatch: they
# skip what is done). `run_requeued CMD…` runs CMD; when it fails — hung (the sampler's watchdog exits
# 124 after every live rank's stacks; srun --kill-on-bad-exit ends the rest) or crashed — the job goes
# back to the queue (#SBATCH --requeue), up to MAX_RESTARTS times (default 3), and the job's status is
# CMD's once they are spent. Bad input (2) is not retried. The failures are counted in RESTARTS_DIR
# (default logs/restarts), one line per requeue in a file named after the job: Slurm's own
# SLURM_RESTART_COUNT also counts preemption's requeues, which must not use up the restarts.
# (launch/_slurm_job.sh does the same for training from the run folder's record of attempts.)

run_requeued() {
  local code count file
  "$@"
  code=$?
  if [ "$code" = 0 ] || [ "$code" = 2 ] || [ -z "${SLURM_JOB_ID:-}" ]; then
    return "$code"
  fi
  file=${RESTARTS_DIR:-logs/restarts}/${SLURM_JOB_ID}
  count=$( [ -f "$file" ] && wc -l < "$file" || echo 0 )
  if [ "$count" -ge "${MAX_RESTARTS:-3}" ]; then
    echo "$(date +%T) failed with $code after $count restart(s) (MAX_RESTARTS=${MAX_RESTARTS:-3}): not requeueing"
    return "$code"
  fi
  mkdir -p "$(dirname "$file")"
  echo "$(date +%T) exit $code" >> "$file"
  echo "$(date +%T) failed with $code: requeueing job $SLURM_JOB_ID (restart $((count + 1)) of ${MAX_RESTARTS:-3})"
  scontrol requeue "$SLURM_JOB_ID" || return "$code"
  return 0
}
