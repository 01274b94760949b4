#!/usr/bin/env bash
# Submit jobs/paper_grid.sbatch as 7 arrays of 12 runs per seed (SEEDS, default "1 2 3"),
# one per arm (1 2 4 8 16 32 clients, then the centralized control: 1 client at batch
# 1024), each asking for as many tasks (GPUs) as its runs have clients, instead of 32 for
# every run.
# Run from anywhere; extra arguments go to every sbatch, e.g.
#
#   jobs/submit_paper_grid.sh --account=proj123 --partition=gpu
#   jobs/submit_paper_grid.sh --time=02:00:00           # longer runs checkpoint and requeue
#   GPUS_PER_NODE=8 jobs/submit_paper_grid.sh
#   FEDMPI_GRID_DRY_RUN=1 jobs/submit_paper_grid.sh      # print the sbatch commands only
#
# Relies on the grid's index layout: with S seeds, arm a (0-5: 2^a clients, 6: the control)
# is indices 12Sa..12S(a+1)-1. SEEDS, VAL_SAMPLES, CONTROL_LR and the grid's other settings
# are passed on to the jobs (sbatch exports the environment).
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a seeds <<<"${SEEDS:-1 2 3}"
export SEEDS="${seeds[*]}"
block=$((12 * ${#seeds[@]}))
gpus_per_node=${GPUS_PER_NODE:-4}
arm_clients=(1 2 4 8 16 32 1) # the last: the control, 1 client at batch 32 x 32
for a in "${!arm_clients[@]}"; do
    clients=${arm_clients[a]}
    per_node=$((clients < gpus_per_node ? clients : gpus_per_node))
    cmd=(
        sbatch --array="$((block * a))-$((block * a + block - 1))" --ntasks="$clients"
        --ntasks-per-node="$per_node" --gpus-per-node="$per_node" "$@" jobs/paper_grid.sbatch
    )
    if [[ "${FEDMPI_GRID_DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "${cmd[@]}"
        echo
    else
        "${cmd[@]}"
    fi
done
