# shellcheck shell=bash
# Shared by jobs/*.sbatch and the local studies (sourced, never run): the software
# environment, the token cache, a launcher that passes the time-limit warning on to the
# ranks, the requeue of a preempted run, and a study's resumable run.
#
# Environment variables (all optional):
#   FEDMPI_MODULES     modules to load first, e.g. "openmpi cuda"
#   FEDMPI_VENV        a virtual environment to activate (its bin/activate), or
#   FEDMPI_CONDA_ENV   a conda environment to activate; with neither, the `python` on PATH
#                      (sbatch passes on the submitting shell's environment by default)
#   FEDMPI_CACHE       tokenized-data cache; must be on a filesystem every node sees
#                      (default: .cache/fedmpi in the submit directory)
#   FEDMPI_LAUNCHER    srun (default) or mpirun, see fedmpi_launch

# fedmpi's exit status after a graceful stop (fedmpi.preemption.EXIT_PREEMPTED): a rank got
# SIGTERM or SIGUSR1, rank 0 wrote OUTPUT/checkpoint.h5 with the last finished round, and
# rerunning the same command resumes from it.
FEDMPI_EXIT_PREEMPTED=75

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

# The batch shell gets USR1 two minutes before the time limit (--signal=B:USR1@120; by hand:
# `scancel --batch --signal=USR1 JOBID`) and passes it on to the launcher, which forwards
# it to the ranks: srun to every task of its step, and the mpirun of Open MPI and of MPICH
# to every rank. fedmpi then finishes its current local step, rank 0 writes the checkpoint
# of the last finished round, and every rank exits with 75 (see fedmpi_requeue_if_preempted).
# Going through the batch shell (the B:) logs the signal in the job log and takes the same
# route with either launcher.
fedmpi_on_time_limit() {
    _fedmpi_signalled=1
    if [[ -z "${_fedmpi_launcher_pid:-}" ]]; then
        echo "fedmpi job ${SLURM_JOB_ID:-}: got USR1 with no fedmpi running: ignored" >&2
        return 0
    fi
    echo "fedmpi job ${SLURM_JOB_ID:-}: got USR1 (time limit in about 2 minutes):" \
        "passing it on to the ranks, which checkpoint and stop" >&2
    kill -USR1 "$_fedmpi_launcher_pid" 2>/dev/null || true
}

# fedmpi_launch [-N NODES] [-n RANKS] -- FEDMPI_ARGS...
# Runs `srun [-N NODES] [-n RANKS] python -m fedmpi FEDMPI_ARGS` (all of the allocation's
# tasks without -n) and returns its exit status. srun starts the ranks through Slurm's PMI,
# which MPIs built with Slurm support (most site MPIs) need. For an MPI without it,
# FEDMPI_LAUNCHER=mpirun runs `mpirun -np RANKS python -m fedmpi ...` instead (RANKS
# defaults to $SLURM_NTASKS; Open MPI's and MPICH's mpirun read the Slurm allocation
# themselves).
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
    _fedmpi_launcher_pid=
    trap fedmpi_on_time_limit USR1
    "${cmd[@]}" &
    _fedmpi_launcher_pid=$!
    local rc
    while :; do
        _fedmpi_signalled=0
        rc=0
        wait "$_fedmpi_launcher_pid" || rc=$?
        ((_fedmpi_signalled)) || break
    done
    # The trap stays: a USR1 that comes after fedmpi ended (while the job is requeued, say)
    # is logged instead of killing the batch shell.
    _fedmpi_launcher_pid=
    return "$rc"
}

# fedmpi_requeue_if_preempted STATUS: the job's exit status for fedmpi's exit status STATUS.
# 75 (preempted, checkpoint written): requeue this job with `scontrol requeue`, and return
# 0 so that Slurm records no failure; the requeued job runs the batch script again with the
# same arguments, and fedmpi resumes from OUTPUT/checkpoint.h5 by itself. Any other status
# is returned as it is. (Needs #SBATCH --requeue; without a Slurm job, or if the requeue
# fails, it returns 75: rerun the same command to resume.)
fedmpi_requeue_if_preempted() {
    local status=$1
    if ((status != FEDMPI_EXIT_PREEMPTED)); then
        return "$status"
    fi
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "fedmpi job: preempted (exit $status), not in a Slurm job: rerun the same" \
            "command to resume from the checkpoint" >&2
        return "$status"
    fi
    # Logged first: Slurm may end this shell as soon as the job is requeued.
    echo "fedmpi job $SLURM_JOB_ID: preempted (exit $status): requeueing the job, which" \
        "resumes from the checkpoint when it runs again" >&2
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "fedmpi job $SLURM_JOB_ID: scontrol requeue failed: resubmit the same job to" \
            "resume from the checkpoint" >&2
        return "$status"
    fi
    return 0
}

# One run of a study that may span sessions: LABEL OUT COMMAND... Skipped when
# OUT/fedmpi.done exists; resumed when OUT holds a checkpoint (fedmpi does that itself);
# started over (--overwrite) when OUT holds results but no checkpoint. A finished run's
# checkpoint (model-sized) is deleted and fedmpi.done written; its log is OUT/fedmpi.log.
fedmpi_run_resumable() {
    local label=$1 out=$2
    shift 2
    local cmd=("$@")
    if [[ -e "$out/fedmpi.done" ]]; then
        echo "$label$out: done before, skipped"
        return 0
    fi
    if [[ -e "$out/results.h5" && ! -e "$out/checkpoint.h5" ]]; then
        cmd+=(--overwrite) # partial, with no checkpoint to resume from: start over
    fi
    mkdir -p "$out"
    local start=$SECONDS summary
    if "${cmd[@]}" >>"$out/fedmpi.log" 2>&1; then
        rm -f "$out/checkpoint.h5"
        touch "$out/fedmpi.done"
        summary=$(grep -o 'final test accuracy [0-9.]*' "$out/fedmpi.log" | tail -n 1 || true)
        echo "$label$out: $((SECONDS - start)) s, ${summary:-finished}"
    else
        echo "$label$out: FAILED after $((SECONDS - start)) s; see $out/fedmpi.log" >&2
        tail -n 3 "$out/fedmpi.log" >&2
        return 1
    fi
}
