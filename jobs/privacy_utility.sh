#!/usr/bin/env bash
# The privacy-utility runs committed under study/privacy/: client-level DP-FedAvg of MiniLM
# with LoRA on rotten_tomatoes, 400 clients partitioned by movie, Poisson cohorts of 40
# (q = 0.1), 12 rounds, at no noise and three noise multipliers; then the report, whose
# privacy_minilm_rotten_tomatoes.png is accuracy against epsilon with the per-client spread.
# Run from anywhere:
#
#   jobs/privacy_utility.sh                          # 8 runs, about 1 h on 2 cores
#   FEDMPI_STUDY_DRY_RUN=1 jobs/privacy_utility.sh   # print the commands only
#
# The design (environment variables override it, defaults in brackets):
#   NOISES [0 0.1 0.3 1.0]: --dp-noise z; 0 is the no-noise baseline (--dp-clip inf)
#   CLIP [2.8]: --dp-clip C for z > 0, the median client update norm of a no-noise pilot
#     (diagnostics/client_update_norm, rounds 1-12: 2.3-3.1)
#   SEEDS [1 2]   ROUNDS [12]   RANKS [2]   OUT_ROOT [study/privacy/runs]
#   REPORT [study/privacy/report]
#
# Training (chosen by pilots: LoRA at lr 5e-4 or 1e-2 with frozen A, or FedAdam on the
# server, stayed near the majority class within 12 rounds; this learns to ~0.74 without
# noise): LoRA r 8 (A trained), AdamW lr 3e-3, batch 8, 2 local epochs, server momentum
# 0.9 (McMahan et al. 2018 use server momentum for DP-FedAvg), uniform weighting, every
# client's local test = 20 % of its shard (--eval-clients), 500 pooled test examples
# from movies no client holds, evaluated every 4 rounds.
#
# Every run checkpoints every round: stop it at any time and rerun; finished runs
# (fedmpi.done) are skipped, an interrupted one resumes from its last round.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=common.sh
source jobs/common.sh

read -r -a noises <<<"${NOISES:-0 0.1 0.3 1.0}"
clip=${CLIP:-2.8}
read -r -a seeds <<<"${SEEDS:-1 2}"
out_root=${OUT_ROOT:-study/privacy/runs}
report=${REPORT:-study/privacy/report}
python=${FEDMPI_PYTHON:-.venv/bin/python}
mpiexec=${FEDMPI_MPIEXEC:-.venv/bin/mpiexec}
ranks=${RANKS:-2}
dry_run=${FEDMPI_STUDY_DRY_RUN:-0}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

failed=0
for seed in "${seeds[@]}"; do
    for noise in "${noises[@]}"; do
        if [[ "$noise" == 0 ]]; then
            dp=(--dp-clip inf --dp-noise 0)
            out="$out_root/minilm-rotten_tomatoes-dp-none-s$seed"
        else
            dp=(--dp-clip "$clip" --dp-noise "$noise")
            out="$out_root/minilm-rotten_tomatoes-dp-z$noise-s$seed"
        fi
        cmd=(
            "$mpiexec" -n "$ranks" "$python" -m fedmpi
            --model minilm --dataset rotten_tomatoes --data-seed 0 --seed "$seed"
            --clients 400 --partition by:movie_name --clients-per-round 40 --weighting uniform
            "${dp[@]}" --server-opt avgm --server-momentum 0.9
            --train-samples all --test-samples 500 --max-seq-len 64 --group-by-length
            --peft lora --lr 3e-3 --batch-size 8 --local-epochs 2
            --rounds "${ROUNDS:-12}" --eval-every 4 --eval-clients --diagnostics off
            --threads 1 --checkpoint-every 1 --output "$out"
        )
        if [[ "$dry_run" == 1 ]]; then
            printf '%q ' "${cmd[@]}"
            echo
        else
            fedmpi_run_resumable "" "$out" "${cmd[@]}" || failed=1
        fi
    done
done
if [[ "$dry_run" != 1 ]]; then
    "$python" -m fedmpi.report "$out_root" --output "$report"
fi
exit "$failed"
