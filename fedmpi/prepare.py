"""Set-up of a federated run, before its first round: placement, output, data, model.

Every phase runs on every rank and agrees on failure (``comm.collectively``): bad input
ends the job here, with one message and exit 2, before anything trains. What rank 0
alone decides (the output directory, the token cache) reaches the others by broadcast.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from mpi4py import MPI

from fedmpi import (
    adapters,
    allocator,
    atomic,
    checkpoint,
    data,
    faults,
    models,
    precision,
    provenance,
    splits,
)
from fedmpi import results_keys as rk
from fedmpi.comm import (
    World,
    collectively,
    log,
    node_layout,
    root_computes,
    root_first,
    select_device,
    usable_cores,
)
from fedmpi.config import Config
from fedmpi.device_rows import DeviceRows
from fedmpi.errors import UsageError
from fedmpi.flat import FlatParameters
from fedmpi.partition import (
    PartitionSpec,
    assign_clients,
    holdout_clients,
    make_shards,
    split_local_test,
    subsample,
)
from fedmpi.results import RESULTS_NAME


@dataclass
class FederationPlan:
    """Who trains what. Computed identically on every rank from (config, seeds) alone."""

    n_clients: int
    shards: list[np.ndarray]  # training rows of each client
    sizes: list[int]
    weights: list[float]  # FedAvg weight of each client
    label_histogram: np.ndarray  # (clients, classes)
    client_rank: list[int]
    my_clients: list[int]
    participants: np.ndarray  # the clients that may train (all but --holdout-clients)
    eval_rows: dict[int, np.ndarray]  # per client, rows it is scored on (--eval-clients,
    # its local test set; a held-out client, its whole shard)
    val_rows: np.ndarray  # --val-samples: train-side rows no client trains on

    @property
    def holdout(self) -> np.ndarray:
        """One flag per client: 1 for the clients that never train."""
        flags = np.ones(self.n_clients, dtype=np.int8)
        flags[self.participants] = 0
        return flags


@dataclass
class Job:
    """Everything the round loop needs, identical on every rank except the local data."""

    device: str
    out_dir: Path
    resuming: bool  # OUTPUT holds a checkpoint to continue from
    info: data.CacheInfo
    plan: FederationPlan
    local_train: dict[int, DeviceRows]  # this rank's clients' shards, on the device
    local_test: DeviceRows  # this rank's slice of the test set
    local_val: DeviceRows | None  # this rank's slice of the validation set (--val-samples)
    client_eval: dict[int, DeviceRows]  # this rank's clients' own evaluation rows
    test_identity: dict  # baselines and hashes of the whole test (and validation) set
    model: torch.nn.Module
    flat: FlatParameters
    precision: str  # of the forward and backward passes: --precision, or the frozen base's


def prepare(cfg: Config, world: World) -> Job:
    device = collectively(world, lambda: _place(cfg, world))
    models.quiet_transformers()

    out_dir = Path(root_computes(world, lambda: _output_dir(cfg)))
    resuming = root_computes(world, lambda: _check_output(out_dir, cfg))

    cache = Path(root_computes(world, lambda: _prepare_cache(cfg, world)))
    if cfg.node_local_cache:
        copies = collectively(world, lambda: _copy_to_nodes(world, cache))
        if copies:
            log(world, f"data: copied the token cache to {copies} other node(s)")
    info = collectively(world, lambda: _read_info_everywhere(cache))
    plan = collectively(world, lambda: _plan_federation(cfg, world, cache, info))
    all_test_rows = subsample(info.n_test, cfg.test_samples, cfg.data_seed)
    test_rows = np.array_split(all_test_rows, world.size)[world.rank]
    val_rows = np.array_split(plan.val_rows, world.size)[world.rank]

    def load_local_data() -> tuple[
        dict[int, DeviceRows], DeviceRows, DeviceRows | None, dict[int, DeviceRows]
    ]:
        faults.inject(world.rank, 0, "setup")

        def rows(split: str, which: np.ndarray) -> DeviceRows:
            return DeviceRows.from_rows(data.read_rows(cache, split, which), device)

        mine = [k for k in plan.my_clients if k in set(plan.participants.tolist())]
        train = {k: rows("train", plan.shards[k]) for k in mine}
        own = {k: rows("train", plan.eval_rows[k]) for k in plan.my_clients if k in plan.eval_rows}
        val = rows("train", val_rows) if len(plan.val_rows) else None
        return train, rows("test", test_rows), val, own

    local_train, local_test, local_val, client_eval = collectively(world, load_local_data)
    test_identity = root_computes(
        world,
        lambda: _test_identity(cache, all_test_rows, plan.val_rows, len(info.label_names)),
    )
    log(world, f"data: {info.how_split}")
    log(
        world,
        f"data: {sum(plan.sizes)} training examples in {plan.n_clients} {cfg.partition} "
        f"shards of {min(plan.sizes)}-{max(plan.sizes)}, {len(all_test_rows)} test examples "
        f"(majority class {test_identity['majority_rate']:.3f}), "
        + (
            f"{len(plan.val_rows)} validation examples (majority class "
            f"{test_identity['val_majority_rate']:.3f}), "
            if len(plan.val_rows)
            else ""
        )
        + f"{len(info.label_names)} classes {info.label_names}",
    )

    model, compute = _load_model(cfg, world, info, device)
    model.to(device)
    # Flatten after the move: model.to() would replace the views with fresh tensors.
    flat = FlatParameters(model, tail=4)
    trainable, total = adapters.describe(model)
    frozen = ", ".join(str(d).removeprefix("torch.") for d in adapters.frozen_dtypes(model))
    log(
        world,
        f"model: {cfg.model} ({type(model).__name__}), {trainable:,} trainable of {total:,} "
        f"parameters ({100 * trainable / total:.2f} %), Allreduce payload "
        f"{flat.storage.numel() * 4 / 2**20:.1f} MiB; trainable in float32"
        + (f", frozen in {frozen}" if frozen else "")
        + f", compute in {compute}",
    )
    return Job(
        device,
        out_dir,
        resuming,
        info,
        plan,
        local_train,
        local_test,
        local_val,
        client_eval,
        test_identity,
        model,
        flat,
        compute,
    )


def _place(cfg: Config, world: World) -> str:
    """One device per rank; CPU ranks on one node share its cores as torch threads."""
    device = select_device(world, cfg.device)
    precision.check(cfg.precision, device)
    threads = cfg.threads or usable_cores(world)
    if device == "cpu":
        torch.set_num_threads(threads)
    log(
        world,
        startup_line(
            world.size, cfg.num_clients(world.size), device, threads, allocator.describe()
        ),
    )
    layout = node_layout(world)
    if ";" in layout:  # more than one node
        log(world, f"nodes: {layout}")
    return device


def startup_line(ranks: int, clients: int, device: str, threads: int, malloc: str) -> str:
    """The first log line of a run (README.md quotes it; tests/test_docs.py checks it)."""
    return (
        f"{ranks} ranks, {clients} clients, device {device}"
        + (f", {threads} torch threads per rank" if device == "cpu" else "")
        + f", malloc {malloc}"
    )


def _plan_federation(
    cfg: Config, world: World, cache: Path, info: data.CacheInfo
) -> FederationPlan:
    n_clients = cfg.num_clients(world.size)
    n_classes = len(info.label_names)
    labels = data.read_column(cache, "train", "labels")
    try:
        pool, val_rows = splits.validation_split(
            labels, data.read_split_groups(cache), cfg.val_samples, [cfg.data_seed, 1]
        )
    except ValueError as exc:
        raise UsageError(f"--val-samples {cfg.val_samples}: {exc}") from None
    rows = pool[subsample(len(pool), cfg.train_samples, cfg.data_seed)]
    if len(rows) < n_clients:
        raise UsageError(
            f"{len(rows)} training examples cannot give each of {n_clients} clients one"
        )
    spec = PartitionSpec.parse(cfg.partition)
    groups = data.read_groups(cache, spec.column) if spec.kind == "by" else None
    try:
        shards = make_shards(
            spec, rows, labels[rows], None if groups is None else groups[rows], n_clients, cfg.seed
        )
    except ValueError as exc:
        raise UsageError(f"--partition {cfg.partition}: {exc}") from None
    held_out = holdout_clients(n_clients, cfg.holdout_clients, cfg.seed)
    eval_rows = {int(k): shards[k] for k in held_out}
    if cfg.eval_clients:
        for k in range(n_clients):
            if k not in eval_rows:
                shards[k], eval_rows[k] = split_local_test(
                    shards[k], cfg.client_test_fraction, cfg.seed, k
                )
    sizes = [len(shard) for shard in shards]
    assignment = assign_clients(sizes, world.size)
    client_rank = [0] * n_clients
    for rank, clients in enumerate(assignment):
        for client in clients:
            client_rank[client] = rank
    return FederationPlan(
        n_clients=n_clients,
        shards=shards,
        sizes=sizes,
        weights=[float(s) for s in sizes] if cfg.weighting == "examples" else [1.0] * n_clients,
        label_histogram=np.stack([np.bincount(labels[s], minlength=n_classes) for s in shards]),
        client_rank=client_rank,
        my_clients=assignment[world.rank],
        participants=np.setdiff1d(np.arange(n_clients), held_out),
        eval_rows=eval_rows,
        val_rows=val_rows,
    )


def _prepare_cache(cfg: Config, world: World) -> str:
    """Rank 0 loads and tokenizes the corpus once, or finds it cached (and rebuilds a
    cache that is incomplete); the length limit is checked before any tokenizing."""
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    models.check_max_seq_len(cfg.model, cfg.max_seq_len, tokenizer, cfg.trust_remote_code)
    path = data.cache_path(cfg, tokenizer)
    if path.exists():
        try:
            data.read_info(path)
            log(world, f"data: cached tokens {path}")
            return str(path)
        except data.IncompleteCache as exc:
            log(world, f"data: {exc}: rebuilding it")
    log(world, f"data: loading {cfg.dataset!r}, tokenizing into {path}")
    data.build_cache(cfg, tokenizer, path, progress=lambda msg: log(world, f"data: {msg}"))
    return str(path)


def _read_info_everywhere(cache: Path) -> data.CacheInfo:
    if not cache.exists():
        raise UsageError(
            f"the token cache {cache} written by rank 0 is not visible here: put "
            "--cache-dir on a filesystem that every node shares, or pass --node-local-cache"
        )
    return data.read_info(cache)


COPY_PIECE = 2**28  # bytes per Bcast of the cache file (MPI counts are ints)


def _copy_to_nodes(world: World, cache: Path) -> int:
    """--node-local-cache: rank 0 sends its token cache to node-local rank 0 of every node
    whose own copy at the same path is missing or different; how many nodes got one.

    The cache is a few MB to a few hundred MB and sent once, over MPI: no node but rank
    0's needs the corpus or a filesystem the others can see. Only node leaders take part.
    """
    leaders = world.comm.Split(0 if world.local_rank == 0 else MPI.UNDEFINED, world.rank)
    if leaders == MPI.COMM_NULL:
        return 0
    try:
        wanted = leaders.bcast(data.read_info(cache).content_sha256 if world.is_root else None)
        need = not world.is_root and _holds(cache) != wanted
        copies = leaders.allreduce(int(need))
        if not copies:
            return 0
        receivers = leaders.Split(1 if need or world.is_root else MPI.UNDEFINED, world.rank)
        if receivers == MPI.COMM_NULL:
            return copies
        try:
            blob = np.fromfile(cache, dtype=np.uint8) if world.is_root else None
            size = receivers.bcast(len(blob) if blob is not None else 0)
            if blob is None:
                blob = np.empty(size, dtype=np.uint8)
            for start in range(0, size, COPY_PIECE):
                receivers.Bcast(blob[start : start + COPY_PIECE], root=0)
        finally:
            receivers.Free()
        if need:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with atomic.replacing(cache) as tmp:
                    blob.tofile(tmp)
            except OSError as exc:
                raise UsageError(
                    f"--node-local-cache: cannot write the token cache {cache} on "
                    f"{MPI.Get_processor_name()}: {exc.strerror or exc}"
                ) from exc
        return copies
    finally:
        leaders.Free()


def _holds(cache: Path) -> str | None:
    """The content hash of this node's copy of the cache, None if it has no usable one."""
    try:
        return data.read_info(cache).content_sha256 if cache.exists() else None
    except data.IncompleteCache:
        return None


def _test_identity(cache: Path, rows: np.ndarray, val_rows: np.ndarray, n_classes: int) -> dict:
    """Baselines and hashes of the evaluated test set (and validation set), for results.h5."""
    test = data.read_rows(cache, "test", rows)
    identity = {
        **provenance.baselines(test.labels, n_classes),
        rk.TEST_SHA256: provenance.rows_sha256(test),
    }
    if len(val_rows):
        val = data.read_rows(cache, "train", val_rows)
        baselines = provenance.baselines(val.labels, n_classes)
        identity[rk.VAL_MAJORITY_RATE] = baselines[rk.MAJORITY_RATE]
        identity[rk.VAL_EXAMPLES] = len(val_rows)
        identity[rk.VAL_SHA256] = provenance.rows_sha256(val)
    return identity


def _load_model(
    cfg: Config, world: World, info: data.CacheInfo, device: str
) -> tuple[torch.nn.Module, str]:
    """The model, identical on every rank, and the precision to compute in.

    Trainable weights are fp32 whatever the checkpoint's dtype. Under LoRA the frozen base
    stays in the checkpoint's dtype when that is bf16 (or fp16 on a GPU): no copy is made,
    so ranks of one node share the memory-mapped weights, and the forward pass then runs
    under autocast in that dtype. Every rank loads a local model at once; a hub model is
    loaded by rank 0 first (it may download), then by the others from the local cache.
    Rank 0's initialised weights (head, adapters) are then broadcast, so every rank starts
    identical even where random initialisation differs between hosts.
    """
    stored = collectively(world, lambda: models.checkpoint_dtype(cfg.model, cfg.trust_remote_code))
    keep_stored = stored == torch.bfloat16 or (stored == torch.float16 and device != "cpu")
    base = stored if cfg.peft == "lora" and keep_stored else torch.float32
    compute = cfg.precision
    if base != torch.float32 and cfg.precision == "fp32":
        compute = {torch.bfloat16: "bf16", torch.float16: "fp16"}[base]

    def load() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        model, new = models.load_model(
            cfg.model, info.label_names, cfg.trust_remote_code, base, info.pad_token_id
        )
        return adapters.apply_lora(model, cfg, new) if cfg.peft == "lora" else model

    # Built-ins are already materialised: rank 0 loaded their tokenizer for the cache.
    local = collectively(world, lambda: Path(models.resolve_model(cfg.model)).is_dir())
    model = collectively(world, load) if local else root_first(world, load)
    initialised = [p for name, p in model.named_parameters() if p.requires_grad or "lora_" in name]
    vector = torch.nn.utils.parameters_to_vector(initialised).detach().contiguous()
    world.comm.Bcast(vector.numpy(), root=0)
    torch.nn.utils.vector_to_parameters(vector, initialised)
    return model, compute


def _output_dir(cfg: Config) -> str:
    if cfg.output:
        return str(Path(cfg.output).expanduser())
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = "-".join(Path(x).name.replace("_", "-") for x in (cfg.model, cfg.dataset))
    return str(Path("runs") / f"{stamp}-{slug}")


def _check_output(out_dir: Path, cfg: Config) -> bool:
    """Whether this run resumes from OUTPUT's checkpoint. Refuses, before any training, to
    clobber results, to share the folder with a running job, and to train for a model or
    optimizer states it could not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output {out_dir} is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".fedmpi-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output directory {out_dir} is not writable: {exc.strerror}") from exc
    _lock_output(out_dir)  # before reading, let alone removing, what a running job writes
    has_checkpoint = (out_dir / checkpoint.CHECKPOINT_NAME).exists()
    if cfg.resume and not has_checkpoint:
        raise UsageError(
            f"--resume: {out_dir} holds no {checkpoint.CHECKPOINT_NAME} to resume from"
        )
    if not has_checkpoint and (out_dir / RESULTS_NAME).exists() and not cfg.overwrite:
        raise UsageError(
            f"{out_dir} already holds {RESULTS_NAME} and no checkpoint: pass --overwrite or "
            "another --output"
        )
    folders = {
        models.SAVED_MODEL: ("--save-model", "the trained model", cfg.save_model),
        checkpoint.CLIENT_STATES: (
            "--keep-local-opt" if cfg.keep_local_opt else "--error-feedback",
            "the clients' states",
            cfg.keep_local_opt or cfg.error_feedback,
        ),
    }
    for name, (flag, what, used) in folders.items():
        folder = out_dir / name
        if used and os.path.lexists(folder) and not folder.is_dir():
            raise UsageError(
                f"{flag}: {folder} exists and is not a directory, so {what} could not be "
                "written there: remove it, or pass another --output"
            )
    if cfg.overwrite and has_checkpoint:
        (out_dir / checkpoint.CHECKPOINT_NAME).unlink()  # never resume a replaced run later
    return has_checkpoint and not cfg.overwrite


LOCK_NAME = ".fedmpi.lock"
_locked: dict[Path, TextIO] = {}  # output folders this process runs in, their locks held open


def _lock_output(out_dir: Path) -> None:
    """One job per output folder: rank 0 holds an exclusive ``flock`` on OUTPUT/.fedmpi.lock
    for as long as its process lives. Two jobs in one folder would interleave results and
    overwrite each other's checkpoints, so a second one is refused at once, naming the
    first. The kernel drops the lock when the process ends, however it ends (SIGKILL, a
    lost node), so a crash never leaves a stale lock behind."""
    key = out_dir.resolve()
    if key in _locked:
        return  # this process already runs a job here (fedmpi called in-process again)
    try:
        handle = open(out_dir / LOCK_NAME, "a+")  # noqa: SIM115 (held until the process ends)
    except OSError as exc:
        raise UsageError(f"output directory {out_dir} is not writable: {exc.strerror}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "its process is still starting"
        handle.close()
        raise UsageError(
            f"output directory {out_dir} is in use by another fedmpi job ({holder}): wait "
            "for it to end, or pass another --output"
        ) from None
    except OSError as exc:  # a filesystem without locks (Lustre mounted without flock)
        handle.close()
        print(
            f"[fedmpi] warning: cannot lock {out_dir / LOCK_NAME} ({exc.strerror}): nothing "
            f"keeps a second job from writing to {out_dir} at the same time",
            flush=True,
        )
        return
    handle.truncate(0)
    started = datetime.now().isoformat(timespec="seconds")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
    handle.flush()
    _locked[key] = handle
