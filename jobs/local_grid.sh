#!/usr/bin/env bash
# A CPU-sized version of the paper's grid on this machine, on the offline built-ins (no
# hub access): models x tasks x client counts, then the report. Run from anywhere:
#
#   jobs/local_grid.sh                                      # 3 x 4 x 3 = 36 runs
#   MODELS=minilm TASKS=rotten_tomatoes CLIENTS="1 2" ROUNDS=1 jobs/local_grid.sh
#   FEDMPI_GRID_DRY_RUN=1 jobs/local_grid.sh                # print the commands only
#
# Settings (environment variables, defaults in brackets):
#   MODELS [minilm distil-minilm albert-tiny]     TASKS [rotten_tomatoes tweets bbc_news debates]
#   CLIENTS [1 2 4]   ROUNDS [3]   TRAIN_SAMPLES [400]   TEST_SAMPLES [300]
#   MAX_SEQ_LEN [48]  LOCAL_EPOCHS [1]   BATCH_SIZE [16]
#   LR [5e-5; 1e-3 for albert-tiny, which is randomly initialised]
#   MAX_RANKS [2]: MPI ranks per run, at most the clients (a 1-client run uses 1 rank)
#   OUT_ROOT [runs/local-grid]: each run writes OUT_ROOT/<model>-<task>-<K>c, the report
#   goes to OUT_ROOT/report
#   FEDMPI_PYTHON [.venv/bin/python]   FEDMPI_MPIEXEC [.venv/bin/mpiexec]
#
# Local training is the paper's shape at a smaller size (AdamW instead of SGD: SGD at
# lr 2e-5 barely moves in 3 short rounds). A run that finished (fedmpi.done next to its
# results.h5) is skipped, so an interrupted grid resumes where it stopped; a partial run
# resumes from its checkpoint.h5 if it has one (fedmpi writes one when stopped by SIGTERM
# or SIGUSR1, exit 75), and starts over with --overwrite if not. A failed run is reported
# and the grid goes on; the script exits 1 at the end if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a models <<<"${MODELS:-minilm distil-minilm albert-tiny}"
read -r -a tasks <<<"${TASKS:-rotten_tomatoes tweets bbc_news debates}"
read -r -a client_counts <<<"${CLIENTS:-1 2 4}"
out_root=${OUT_ROOT:-runs/local-grid}
python=${FEDMPI_PYTHON:-.venv/bin/python}
mpiexec=${FEDMPI_MPIEXEC:-.venv/bin/mpiexec}
max_ranks=${MAX_RANKS:-2}
dry_run=${FEDMPI_GRID_DRY_RUN:-0}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

total=$((${#models[@]} * ${#tasks[@]} * ${#client_counts[@]}))
n=0
failed=()
for model in "${models[@]}"; do
    default_lr=5e-5
    if [[ "$model" == albert-tiny ]]; then default_lr=1e-3; fi
    for task in "${tasks[@]}"; do
        for clients in "${client_counts[@]}"; do
            n=$((n + 1))
            out="$out_root/$model-$task-${clients}c"
            ranks=$((clients < max_ranks ? clients : max_ranks))
            cmd=(
                "$mpiexec" -n "$ranks" "$python" -m fedmpi
                --model "$model" --dataset "$task" --clients "$clients"
                --rounds "${ROUNDS:-3}" --train-samples "${TRAIN_SAMPLES:-400}"
                --test-samples "${TEST_SAMPLES:-300}" --max-seq-len "${MAX_SEQ_LEN:-48}"
                --local-epochs "${LOCAL_EPOCHS:-1}" --batch-size "${BATCH_SIZE:-16}"
                --optimizer adamw --lr "${LR:-$default_lr}" --output "$out"
            )
            if [[ "$dry_run" == 1 ]]; then
                printf '%q ' "${cmd[@]}"
                echo
                continue
            fi
            if [[ -e "$out/fedmpi.done" ]]; then
                echo "[$n/$total] $out: done before, skipped"
                continue
            fi
            if [[ -e "$out/results.h5" && ! -e "$out/checkpoint.h5" ]]; then
                cmd+=(--overwrite) # partial, no checkpoint to resume from: start over
            fi
            mkdir -p "$out"
            start=$SECONDS
            if "${cmd[@]}" >"$out/fedmpi.log" 2>&1; then
                touch "$out/fedmpi.done"
                summary=$(grep -o 'final test accuracy [0-9.]*' "$out/fedmpi.log" || true)
                echo "[$n/$total] $out: $((SECONDS - start)) s, ${summary:-finished}"
            else
                failed+=("$out")
                echo "[$n/$total] $out: FAILED after $((SECONDS - start)) s; last lines of" \
                    "$out/fedmpi.log:" >&2
                tail -n 5 "$out/fedmpi.log" >&2
            fi
        done
    done
done

report=("$python" -m fedmpi.report "$out_root" --out "$out_root/report" --skip-invalid)
if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "${report[@]}"
    echo
    exit 0
fi
if [[ -n "$(find "$out_root" -name results.h5 -print -quit 2>/dev/null)" ]]; then
    "${report[@]}"
fi
if ((${#failed[@]} > 0)); then
    echo "local grid: ${#failed[@]} of $total runs failed: ${failed[*]}" >&2
    exit 1
fi
