#!/usr/bin/env bash
# A drop-path sweep as a SLURM job array: task i of N trains the i-th slice of the members in one
# shared workdir (experiments/sweep_drop_path.py reads its shard from SLURM_ARRAY_TASK_ID and
# SLURM_ARRAY_TASK_COUNT). The last task to finish writes WORKDIR/sweep_results.{csv,md,png}.
#
#   sbatch --array=0-3 experiments/slurm_sweep.sh                 # 4 shards
#   sbatch --array=0-3 --export=ALL,WORKDIR=runs/sweep_c10,CONFIG=experiments/configs/cifar10.py \
#       experiments/slurm_sweep.sh
#
# An array task can itself be a multi-process job (several nodes, or one process per GPU): give
# it more than one task and the script starts them with srun, which joins them as one JAX job
# (one shard, trained data-parallel over all their devices):
#
#   sbatch --array=0-3 --nodes=2 --ntasks-per-node=4 --gres=gpu:4 experiments/slurm_sweep.sh
#
# On a time limit or preemption SLURM sends SIGTERM (--signal below: 120 s before the limit);
# the sweep saves a checkpoint after the step in flight and exits with status 75, on which this
# script requeues its own task, which then resumes bit-identically. Run from the repository root
# with `make install` done (or set PYTHON). If results were not written (a task failed), run the
# same sweep command with --collect once every member has finished.
#SBATCH --job-name=fractal-sweep
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%A_%a.out
set -uo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-experiments/configs/cifar10.py}
WORKDIR=${WORKDIR:-runs/sweep}
SEEDS=${SEEDS:-0,1,2}
P_LOCAL=${P_LOCAL:-0,0.15,0.3}
P_GLOBAL=${P_GLOBAL:-0,0.5}

# Several tasks: srun starts one process per task (it passes SIGTERM on to each of them, and they
# stop after the same step); JAX finds the job from srun's environment.
LAUNCH=()
if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  LAUNCH=(srun)
  set -- "$@" --config.distributed=True
fi

# In the background, so that bash can pass SLURM's SIGTERM on while the sweep runs.
"${LAUNCH[@]}" "$PYTHON" experiments/sweep_drop_path.py --config "$CONFIG" --workdir "$WORKDIR" \
    --seeds "$SEEDS" --p_local "$P_LOCAL" --p_global "$P_GLOBAL" "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
wait "$child"
status=$?
if [ "$status" -gt 128 ]; then  # `wait` was interrupted by the trap: wait for the save
  wait "$child"
  status=$?
fi
if [ "$status" -eq 75 ]; then
  echo "stopped on request after a checkpoint: requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
exit "$status"
