# shellcheck shell=bash
# Shared by jobs/*.sbatch (sourced, never run): the software environment, the token cache,
# and a launcher that keeps waiting for the ranks when the time-limit warning arrives.
#
# Environment variables (all optional):
#   FEDMPI_MODULES     modules to load first, e.g. "openmpi cuda"
#   FEDMPI_VENV        a virtual environment to activate (its bin/activate), or
#   FEDMPI_CONDA_ENV   a conda environment to activate; with neither, the `python` on PATH
#                      (sbatch passes on the submitting shell's environment by default)
#   FEDMPI_CACHE       tokenized-data cache; must be on a filesystem every node sees
#                      (default: .cache/fedmpi in the submit directory)
#   FEDMPI_LAUNCHER    srun (default) or mpirun, see fedmpi_launch

# Load modules and activate the environment, then check that fedmpi imports.
fedmpi_activate() {
    set +u # activate scripts and `module` read variables that may be unset
    if [[ -n "${FEDMPI_MODULES:-}" ]]; then
        # shellcheck disable=SC2086  # a space-separated list of module names
        module load $FEDMPI_MODULES
    fi
    if [[ -n "${FEDMPI_VENV:-}" ]]; then
        # shellcheck source=/dev/null
        source "$FEDMPI_VENV/bin/activate"
    elif [[ -n "${FEDMPI_CONDA_ENV:-}" ]]; then
        eval "$(conda shell.bash hook)"
        conda activate "$FEDMPI_CONDA_ENV"
    fi
    set -u
    # Rank 0 tokenizes once into this cache and every rank reads its rows from it, so it
    # must be shared: a node-local /tmp would leave the other nodes without the file.
    export FEDMPI_CACHE="${FEDMPI_CACHE:-$PWD/.cache/fedmpi}"
    export TOKENIZERS_PARALLELISM=false
    if ! python -c 'import fedmpi, mpi4py' 2>/dev/null; then
        echo "fedmpi job: 'python' ($(command -v python || echo none)) cannot import" \
            "fedmpi and mpi4py: set FEDMPI_VENV or FEDMPI_CONDA_ENV" >&2
        return 1
    fi
}

# The ranks are not told about the time limit: fedmpi cannot resume a run, so there is
# nothing for them to save (results.h5 is flushed every round and keeps the rounds done).
# The batch shell gets USR1 (--signal=B:USR1@120) and says so in the job log.
fedmpi_on_time_limit() {
    _fedmpi_signalled=1
    echo "fedmpi job ${SLURM_JOB_ID:-}: time limit in about 2 minutes; fedmpi cannot resume," \
        "results.h5 keeps the rounds finished so far: resubmit with a longer --time" >&2
}

# fedmpi_launch [-N NODES] [-n RANKS] -- FEDMPI_ARGS...
# Runs `srun [-N NODES] [-n RANKS] python -m fedmpi FEDMPI_ARGS` (all of the allocation's
# tasks without -n). srun starts the ranks through Slurm's PMI, which MPIs built with Slurm
# support (most site MPIs) need. For an MPI without it, FEDMPI_LAUNCHER=mpirun runs
# `mpirun -np RANKS python -m fedmpi ...` instead (RANKS defaults to $SLURM_NTASKS; Open
# MPI's and MPICH's mpirun read the Slurm allocation themselves).
fedmpi_launch() {
    local launcher_args=() ranks=${SLURM_NTASKS:-}
    while (($# > 0)) && [[ "$1" != "--" ]]; do
        if [[ "$1" == -n ]]; then ranks=$2; fi
        launcher_args+=("$1")
        shift
    done
    shift # the "--"
    local cmd
    if [[ "${FEDMPI_LAUNCHER:-srun}" == mpirun ]]; then
        cmd=(mpirun -np "${ranks:?not inside a Slurm allocation: no SLURM_NTASKS}")
    else
        # srun of Slurm >= 22.05 no longer takes --cpus-per-task from the allocation: pass
        # it on, or every rank is bound to a single core.
        if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
            export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
        fi
        # (the ${a[@]+...} form: bash < 4.4 calls an empty array unbound under set -u)
        cmd=(srun --kill-on-bad-exit=1 ${launcher_args[@]+"${launcher_args[@]}"})
    fi
    cmd+=(python -m fedmpi "$@")
    echo "fedmpi job ${SLURM_JOB_ID:-}: ${cmd[*]}" >&2
    # In the background, so that the USR1 trap runs while the ranks keep going; a trapped
    # signal interrupts `wait`, which is then resumed until the launcher really exits.
    trap fedmpi_on_time_limit USR1
    "${cmd[@]}" &
    local pid=$! rc
    while :; do
        _fedmpi_signalled=0
        rc=0
        wait "$pid" || rc=$?
        ((_fedmpi_signalled)) || break
    done
    trap - USR1
    return "$rc"
}
