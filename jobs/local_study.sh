#!/usr/bin/env bash
# The CPU study committed under study/: how do pretrained models tolerate FedAvg as the
# same training data is split over more clients? models x tasks x clients x seeds on the
# offline built-ins, then the report. Run from anywhere (or `make study`):
#
#   jobs/local_study.sh                          # (2 x 5 + 1 x 3) x 3 = 39 runs, 1-2 h on 2 cores
#   FEDMPI_STUDY_DRY_RUN=1 jobs/local_study.sh   # print the commands only
#   MODELS=minilm SEEDS=1 CLIENTS="1 16" jobs/local_study.sh      # a slice of it
#
# The design (environment variables override it, defaults in brackets):
#   MODELS [minilm mpnet]   TASKS [rotten_tomatoes tweets]   CLIENTS [1 2 4 8 16]
#   MPNET_TASKS [rotten_tomatoes]   MPNET_CLIENTS [1 4 16]: mpnet's share (an AdamW step of
#     it costs ~7x MiniLM's), TASKS and CLIENTS for every other model
#   SEEDS [1 2 3]: --seed (shards, order, dropout, head); the data (split, the 160
#     training and 200 test examples) follow --data-seed 0 in every run, so all seeds and
#     client counts of a task are scored on the same test set
#   ROUNDS [6]   TRAIN_SAMPLES [160]   TEST_SAMPLES [200]   BATCH_SIZE [8]   LOCAL_EPOCHS [1]
#   MAX_SEQ_LEN [64], with --group-by-length; AdamW, lr 1e-4 for minilm and 5e-5 for mpnet
#   (LR overrides both)
#   JOBS [2]: runs at once, each one MPI rank with one torch thread (results do not depend
#     on -np: tests/test_algorithms_mpi.py); RANKS [1] ranks per run
#   OUT_ROOT [study/runs]: each run writes OUT_ROOT/<model>-<task>-<K>c-s<seed>;
#   REPORT [study/report]
#
# With the total fixed at 160 examples, K clients hold 160/K each: 20 local steps a round
# for 1 client, 2 for 16 (batch 8, one epoch). Every run checkpoints every round: the
# study can be stopped at any time (a session ending, Ctrl-C) and rerun; finished runs
# (fedmpi.done beside results.h5) are skipped and an interrupted run resumes from its
# last round. A finished run's checkpoint (the model, 87-438 MB) is deleted; results.h5
# and fedmpi.log stay (about 60 KB). A failed run is reported and the others go on; the
# script exits 1 at the end if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=common.sh
source jobs/common.sh

read -r -a models <<<"${MODELS:-minilm mpnet}"
read -r -a tasks <<<"${TASKS:-rotten_tomatoes tweets}"
read -r -a client_counts <<<"${CLIENTS:-1 2 4 8 16}"
read -r -a mpnet_tasks <<<"${MPNET_TASKS:-rotten_tomatoes}"
read -r -a mpnet_clients <<<"${MPNET_CLIENTS:-1 4 16}"
read -r -a seeds <<<"${SEEDS:-1 2 3}"
out_root=${OUT_ROOT:-study/runs}
report=${REPORT:-study/report}
python=${FEDMPI_PYTHON:-.venv/bin/python}
mpiexec=${FEDMPI_MPIEXEC:-.venv/bin/mpiexec}
jobs=${JOBS:-2}
ranks=${RANKS:-1}
dry_run=${FEDMPI_STUDY_DRY_RUN:-0}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

learning_rate() {
    case "$1" in
        mpnet) echo "${LR:-5e-5}" ;;
        *) echo "${LR:-1e-4}" ;;
    esac
}

# One run: print it (dry run), or run it resumably (jobs/common.sh).
run_one() {
    local model=$1 task=$2 clients=$3 seed=$4 n=$5 total=$6
    local out="$out_root/$model-$task-${clients}c-s$seed"
    local np=$((clients < ranks ? clients : ranks))
    local cmd=(
        "$mpiexec" -n "$np" "$python" -m fedmpi
        --model "$model" --dataset "$task" --clients "$clients" --seed "$seed" --data-seed 0
        --rounds "${ROUNDS:-6}" --train-samples "${TRAIN_SAMPLES:-160}"
        --test-samples "${TEST_SAMPLES:-200}" --max-seq-len "${MAX_SEQ_LEN:-64}"
        --batch-size "${BATCH_SIZE:-8}" --local-epochs "${LOCAL_EPOCHS:-1}" --group-by-length
        --optimizer adamw --lr "$(learning_rate "$model")" --threads 1
        --checkpoint-every 1 --output "$out"
    )
    if [[ "$dry_run" == 1 ]]; then
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    fedmpi_run_resumable "[$n/$total] " "$out" "${cmd[@]}"
}

# The design's cells, seed by seed (so that an interrupted study already holds whole seeds).
cells=()
for seed in "${seeds[@]}"; do
    for model in "${models[@]}"; do
        model_tasks=("${tasks[@]}") model_clients=("${client_counts[@]}")
        if [[ "$model" == mpnet ]]; then
            model_tasks=("${mpnet_tasks[@]}") model_clients=("${mpnet_clients[@]}")
        fi
        for task in "${model_tasks[@]}"; do
            for clients in "${model_clients[@]}"; do
                cells+=("$model $task $clients $seed")
            done
        done
    done
done
total=${#cells[@]}
n=0
failed=0
running=0
for cell in "${cells[@]}"; do
    read -r model task clients seed <<<"$cell"
    n=$((n + 1))
    if [[ "$dry_run" == 1 ]]; then
        run_one "$model" "$task" "$clients" "$seed" "$n" "$total"
        continue
    fi
    if ((running >= jobs)); then
        wait -n || failed=$((failed + 1))
        running=$((running - 1))
    fi
    run_one "$model" "$task" "$clients" "$seed" "$n" "$total" &
    running=$((running + 1))
done
while ((running > 0)); do
    wait -n || failed=$((failed + 1))
    running=$((running - 1))
done

report_cmd=("$python" -m fedmpi.report "$out_root" --output "$report")
if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "${report_cmd[@]}"
    echo
    exit 0
fi
"${report_cmd[@]}"
if ((failed > 0)); then
    echo "local study: $failed of $total runs failed" >&2
    exit 1
fi
