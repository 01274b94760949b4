#!/usr/bin/env bash
# The privacy-utility runs committed under study/privacy/: client-level DP-FedAvg of MiniLM
# (LoRA with frozen A) on rotten_tomatoes, one client per movie group (400 clients), a
# Poisson cohort of 40 a round expected, at noise multipliers z = NOISE (default 0.3 0.6
# 1.0) and one run without noise or clipping (--dp-clip inf --dp-noise 0: Poisson cohorts
# and a fixed denominator, nothing else), then the report with its accuracy-vs-epsilon
# figure. Run from anywhere:
#
#   jobs/privacy_utility.sh                          # 4 runs, ~25 min on 2 cores
#   FEDMPI_STUDY_DRY_RUN=1 jobs/privacy_utility.sh   # print the commands only
#
# Settings (environment variables, defaults in brackets): NOISE [0.3 0.6 1.0], CLIP [0.1]
# (about the median update norm of the noiseless run's clients in its first rounds:
# diagnostics/client_update_norm), ROUNDS [15], SEED [1], OUT_ROOT [study/privacy/runs],
# REPORT [study/privacy/report]. 10 % of the clients never train (--holdout-clients 0.1):
# the model is also scored on their data; every client keeps 20 % of its shard as its own
# test set (--eval-clients). Choosing CLIP from a noiseless run's norms is not itself
# private; a real deployment fixes it in advance. Finished runs are skipped; an interrupted
# one resumes from its last round (--checkpoint-every 1).
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a noises <<<"${NOISE:-0.3 0.6 1.0}"
clip=${CLIP:-0.1}
out_root=${OUT_ROOT:-study/privacy/runs}
report=${REPORT:-study/privacy/report}
python=${FEDMPI_PYTHON:-.venv/bin/python}
mpiexec=${FEDMPI_MPIEXEC:-.venv/bin/mpiexec}
dry_run=${FEDMPI_STUDY_DRY_RUN:-0}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# One run: its name and the DP flags that differ between runs.
run_one() {
    local name=$1
    shift
    local out="$out_root/$name"
    local cmd=(
        "$mpiexec" -n 2 "$python" -m fedmpi
        --model minilm --dataset rotten_tomatoes --partition by:movie_name --clients 400
        --train-samples all --test-samples 500 --max-seq-len 64 --batch-size 16
        --clients-per-round 40 --weighting uniform --holdout-clients 0.1 --eval-clients
        --peft lora --lora-freeze-a --lr 5e-4 --rounds "${ROUNDS:-15}" --eval-every 5
        --seed "${SEED:-1}" --data-seed 0 --threads 1 --checkpoint-every 1 --output "$out"
        "$@"
    )
    if [[ "$dry_run" == 1 ]]; then
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    if [[ -e "$out/fedmpi.done" ]]; then
        echo "$out: done before, skipped"
        return 0
    fi
    if [[ -e "$out/results.h5" && ! -e "$out/checkpoint.h5" ]]; then
        cmd+=(--overwrite)
    fi
    mkdir -p "$out"
    local start=$SECONDS
    "${cmd[@]}" >>"$out/fedmpi.log" 2>&1
    rm -rf "$out/checkpoint.h5" "$out/client-states"
    touch "$out/fedmpi.done"
    echo "$out: $((SECONDS - start)) s, $(grep -o 'final test accuracy [0-9.]*' "$out/fedmpi.log" | tail -n 1)"
}

# The noiseless run first: its update norms are what CLIP was chosen from.
run_one no-noise --dp-clip inf --dp-noise 0 --diagnostics norms
for z in "${noises[@]}"; do
    run_one "clip$clip-noise$z" --dp-clip "$clip" --dp-noise "$z" --diagnostics off
done

report_cmd=("$python" -m fedmpi.report "$out_root" --output "$report")
if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "${report_cmd[@]}"
    echo
    exit 0
fi
"${report_cmd[@]}"
