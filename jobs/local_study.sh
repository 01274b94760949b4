#!/usr/bin/env bash
# The CPU studies committed under study/ (docs/study.md, docs/compression.md): does FedAvg
# fine-tuning of a pretrained encoder slow down, or collapse, as one training set is split
# over more clients, and is that the averaging or the fewer, larger steps? Arms are
# (clients x batch) on the same 640 training examples, with a centralized control; every
# choice is made on validation data. Run from anywhere (or `make study`, `make study-pilot`,
# `make study-compression`):
#
#   jobs/local_study.sh                          # 4 arms x 5 seeds = 20 runs, ~2 h on 2 cores
#   STUDY=pilot jobs/local_study.sh              # the learning-rate pilot (study/pilot)
#   STUDY=compression jobs/local_study.sh        # 6 update codecs x 3 seeds (study/compression)
#   STUDY=privacy-pilot jobs/local_study.sh      # its server optimizers (8 runs, seed 0)
#   STUDY=privacy jobs/local_study.sh            # 8 DP arms x 3 seeds (study/privacy)
#   FEDMPI_STUDY_DRY_RUN=1 jobs/local_study.sh   # print the commands only
#   SEEDS=1 ARMS="1x8 16x8" jobs/local_study.sh  # a slice of it
#
# The design (environment variables override it, defaults in brackets):
#   MODELS [minilm]   TASKS [rotten_tomatoes] (split by movie)
#   ARMS [1x8 4x8 16x8 1x128]: CLIENTSxBATCH. Equal IID shards of TRAIN_SAMPLES, one local
#     epoch a round: 1x8 takes 80 steps a round, 4x8 20 per client, 16x8 5 per client;
#     1x128 is the centralized control: 5 steps of 128 = the examples of one 16x8 round,
#     one step's worth of each of its clients, in one step (no averaging)
#   VARIANTS []: ";"-separated NAME:FLAGS, each a further arm with more fedmpi flags (the
#     run's directory gets -NAME; {seed} in FLAGS becomes the run's seed); empty: one
#     variant with no further flags
#   SEEDS [1 2 3 4 5]: --seed (shards, order, dropout, head); the data (split, training,
#     validation and test examples) follow --data-seed 0 in every run, so every arm and
#     seed is scored on the same validation and test sets
#   LRS [1e-4]: AdamW learning rates; 1e-4 was chosen on validation by the pilot
#     (docs/study.md: the best mean over the pilot's arms of the best validation accuracy)
#   ROUNDS [20]   TRAIN_SAMPLES [640]   VAL_SAMPLES [300]   TEST_SAMPLES [1000]
#   EVAL_EVERY [2]   MAX_SEQ_LEN [64], with --group-by-length (and, but for privacy,
#   --local-epochs 1 --diagnostics norms)
#   STUDY [main]: a preset of the defaults above:
#     pilot: SEEDS 0 (no seed of the main study), LRS "3e-5 1e-4 3e-4", ARMS "1x8 16x8
#       1x128" (the extremes and the control), ROUNDS 10, OUT_ROOT study/pilot/runs,
#       REPORT study/pilot/report
#     compression: ARMS 8x8, SEEDS "1 2 3", ROUNDS 15, EVAL_EVERY 5, VARIANTS none, bf16,
#       int8, int4, top-k 1 % with and without --error-feedback, OUT_ROOT
#       study/compression/runs, REPORT study/compression/report
#     privacy: LoRA DP-FedAvg over clients that hold movies (see below), ARMS 100x8, LRS
#       3e-3, SEEDS "1 2 3", ROUNDS 10, TRAIN_SAMPLES all, TEST_SAMPLES 500, EVAL_EVERY 5;
#       VARIANTS no DP, clipping only, and epsilon 1, 3, 8 each with frozen-A and plain
#       LoRA (--dp-noise-seed = the seed); OUT_ROOT study/privacy/runs
#     privacy-pilot: SEEDS 0, two server optimizers without noise and at epsilon 1, 3,
#       8 (frozen-A); OUT_ROOT study/privacy/pilot/runs
#   JOBS [2]: runs at once, each one MPI rank with one torch thread (results do not depend
#     on -np: tests/test_algorithms_mpi.py)
#   OUT_ROOT [study/runs]: each run writes OUT_ROOT/<model>-<task>-<K>c-b<B>-lr<LR>[-NAME]-s<seed>
#   REPORT [study/report]
#
# Every run checkpoints every round: the study can be stopped at any time (a session
# ending, Ctrl-C) and rerun; finished runs (fedmpi.done beside results.h5) are skipped and
# an interrupted run resumes from its last round. A finished run's checkpoint is deleted;
# results.h5 and fedmpi.log stay. A failed run is reported and the others go on; the script
# exits 1 at the end if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=common.sh
source jobs/common.sh

# Defaults by preset: seeds, learning rates, rounds, output, report, arms, variants, eval
# every, training examples, test examples, the flags every run of the preset gets.
encoder="--local-epochs 1 --diagnostics norms"
# Client-level DP-FedAvg with LoRA on clients that hold movies (docs/privacy.md): 100
# clients of about 100 reviews (the reviews of about 4 movies each), Poisson cohorts of 5,
# simulated as cohorts of 1,000 of 100,000 for the noise and the accountant; each DP
# level's --dp-noise spends epsilon 1, 3 or 8 at delta 1 / 100000^1.1 after 10 rounds
# (python -m fedmpi.calibrate --epsilon 1 3 8 --rounds 10 --cohort 1000 --population
# 100000). Clip 4.6: the median client update norm of the pilot's chosen no-noise run.
private="--partition by:movie_name --clients-per-round 5 --weighting uniform --peft lora"
private+=" --local-epochs 2 --diagnostics off"
clip=4.6
dp="--dp-clip $clip --dp-noise-cohort 1000 --dp-population 100000 --dp-noise-seed {seed}"
declare -A level_flags=(
    [none]="--dp-clip inf --dp-noise 0" [clip]="--dp-clip $clip --dp-noise 0"
    [eps1]="$dp --dp-noise 0.8291" [eps3]="$dp --dp-noise 0.603" [eps8]="$dp --dp-noise 0.4089"
)
# The server optimizers of STUDY=privacy-pilot, in two stages (docs/privacy.md): without
# noise (client update norms recorded, for the clip), then at each DP level with A frozen.
# The main privacy study uses, at each level, the pilot's best validation accuracy there;
# clipping only takes no DP's.
declare -A servers=([fedavg]="--server-opt fedavg" [adam1e-2]="--server-opt adam --server-lr 1e-2")
# The pilot's best validation accuracy, FedAvg against FedAdam: no DP 0.767 / 0.693,
# epsilon 1: 0.647 / 0.623, epsilon 3: 0.647 / 0.623, epsilon 8: 0.640 / 0.620.
declare -A server_of=([none]=fedavg [clip]=fedavg [eps1]=fedavg [eps3]=fedavg [eps8]=fedavg)
privacy_arms=""
for level in none clip eps1 eps3 eps8; do
    flags="${level_flags[$level]} ${servers[${server_of[$level]}]}"
    if [[ "$level" == eps* ]]; then
        privacy_arms+=";$level-frozen-a:$flags --lora-freeze-a;$level-lora:$flags"
    else
        privacy_arms+=";$level:$flags"
    fi
done
privacy_pilot_arms=""
for level in none eps1 eps3 eps8; do
    for server in fedavg adam1e-2; do
        if [[ "$level" == none ]]; then
            privacy_pilot_arms+=";none-$server:${level_flags[none]} ${servers[$server]} --diagnostics norms"
        else
            privacy_pilot_arms+=";$level-$server:${level_flags[$level]} ${servers[$server]} --lora-freeze-a"
        fi
    done
done
case "${STUDY:-main}" in
main) defaults=("1 2 3 4 5" 1e-4 20 study/runs study/report "1x8 4x8 16x8 1x128" "" 2 640 1000 "$encoder") ;;
pilot) defaults=(0 "3e-5 1e-4 3e-4" 10 study/pilot/runs study/pilot/report "1x8 16x8 1x128" "" 2 640 1000 "$encoder") ;;
compression)
    defaults=("1 2 3" 1e-4 15 study/compression/runs study/compression/report 8x8
        "none:;bf16:--compress bf16;int8:--compress int8;int4:--compress int4;topk1:--compress topk:0.01;topk1-ef:--compress topk:0.01 --error-feedback"
        5 640 1000 "$encoder")
    ;;
privacy)
    defaults=("1 2 3" 3e-3 10 study/privacy/runs study/privacy/report 100x8
        "${privacy_arms#;}" 5 all 500 "$private")
    ;;
privacy-pilot)
    defaults=(0 3e-3 10 study/privacy/pilot/runs study/privacy/pilot/report 100x8
        "${privacy_pilot_arms#;}" 5 all 500 "$private")
    ;;
*)
    echo "local study: STUDY must be main, pilot, compression, privacy or privacy-pilot," \
        "not '$STUDY'" >&2
    exit 2
    ;;
esac
read -r -a preset_flags <<<"${defaults[10]}"
read -r -a models <<<"${MODELS:-minilm}"
read -r -a tasks <<<"${TASKS:-rotten_tomatoes}"
read -r -a arms <<<"${ARMS:-${defaults[5]}}"
read -r -a seeds <<<"${SEEDS:-${defaults[0]}}"
read -r -a lrs <<<"${LRS:-${defaults[1]}}"
IFS=";" read -r -a variants <<<"${VARIANTS-${defaults[6]}}"
((${#variants[@]})) || variants=("")
rounds=${ROUNDS:-${defaults[2]}}
out_root=${OUT_ROOT:-${defaults[3]}}
report=${REPORT:-${defaults[4]}}
python=${FEDMPI_PYTHON:-.venv/bin/python}
mpiexec=${FEDMPI_MPIEXEC:-.venv/bin/mpiexec}
jobs=${JOBS:-2}
dry_run=${FEDMPI_STUDY_DRY_RUN:-0}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# One run: print it (dry run), or run it resumably (jobs/common.sh).
run_one() {
    local model=$1 task=$2 clients=$3 batch=$4 lr=$5 seed=$6 variant=$7 n=$8 total=$9
    local name=${variant%%:*} flags=${variant#*:} more=()
    read -r -a more <<<"${flags//\{seed\}/$seed}"
    local out="$out_root/$model-$task-${clients}c-b$batch-lr$lr${name:+-$name}-s$seed"
    local cmd=(
        "$mpiexec" -n 1 "$python" -m fedmpi
        --model "$model" --dataset "$task" --clients "$clients" --seed "$seed" --data-seed 0
        --rounds "$rounds" --train-samples "${TRAIN_SAMPLES:-${defaults[8]}}"
        --val-samples "${VAL_SAMPLES:-300}" --test-samples "${TEST_SAMPLES:-${defaults[9]}}"
        --eval-every "${EVAL_EVERY:-${defaults[7]}}" --max-seq-len "${MAX_SEQ_LEN:-64}"
        --batch-size "$batch" --group-by-length --optimizer adamw --lr "$lr" --threads 1
        "${preset_flags[@]}" --checkpoint-every 1 --output "$out" ${more[@]+"${more[@]}"}
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
        for task in "${tasks[@]}"; do
            for lr in "${lrs[@]}"; do
                for arm in "${arms[@]}"; do
                    for variant in "${variants[@]}"; do
                        cells+=("$model|$task|${arm%x*}|${arm#*x}|$lr|$seed|$variant")
                    done
                done
            done
        done
    done
done
total=${#cells[@]}
n=0
failed=0
running=0
for cell in "${cells[@]}"; do
    IFS="|" read -r model task clients batch lr seed variant <<<"$cell"
    n=$((n + 1))
    if [[ "$dry_run" == 1 ]]; then
        run_one "$model" "$task" "$clients" "$batch" "$lr" "$seed" "$variant" "$n" "$total"
        continue
    fi
    if ((running >= jobs)); then
        wait -n || failed=$((failed + 1))
        running=$((running - 1))
    fi
    run_one "$model" "$task" "$clients" "$batch" "$lr" "$seed" "$variant" "$n" "$total" &
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
