"""The federated run, top to bottom: set-up, then the round loop.

A round is: the round's cohort of clients is drawn (the same on every rank); every rank
trains its clients in the cohort locally from the same global model, summing
``w_k * theta_k``; one Allreduce sums those over ranks; every rank applies the same server
step; the test set is evaluated shard-wise with one more small Allreduce.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from fedmpi import checkpoint, data, faults, models, precision
from fedmpi.batching import DeviceRows
from fedmpi.client import client_seed, make_optimizer, train_client
from fedmpi.comm import World, collectively, log, select_device, usable_cores, wait_for_all
from fedmpi.config import Config
from fedmpi.diagnostics import UpdateDiagnostics
from fedmpi.errors import UsageError
from fedmpi.evaluate import evaluate
from fedmpi.fedavg import WeightedAllreduce
from fedmpi.flat import FlatParameters
from fedmpi.partition import PartitionSpec, assign_clients, make_shards, sample_cohort, subsample
from fedmpi.preemption import EXIT_PREEMPTED, StopRequest
from fedmpi.results import RESULTS_NAME, ResultsWriter
from fedmpi.server import ServerHyper, ServerOptimizer


def run(cfg: Config, world: World) -> None:
    stop = StopRequest()  # first: a preemption signal during set-up must not kill the rank
    stop.install()

    # --- Placement: one device per rank, threads so co-located ranks share the cores.
    def place() -> str:
        device = select_device(world, cfg.device)
        precision.check(cfg.precision, device)
        return device

    device = collectively(world, place)
    threads = cfg.threads or usable_cores(world)
    if device == "cpu":
        torch.set_num_threads(threads)
    models.quiet_transformers()
    log(
        world,
        f"{world.size} ranks, {cfg.num_clients(world.size)} clients, device {device}"
        + (f", {threads} torch threads per rank" if device == "cpu" else ""),
    )

    # --- Output directory, chosen and checked by rank 0 before any heavy work; a checkpoint
    # there means this run continues an interrupted one.
    out_dir = Path(world.comm.bcast(_output_dir(cfg) if world.is_root else None, root=0))
    resuming = world.comm.bcast(
        collectively(world, lambda: _check_output(out_dir, cfg) if world.is_root else None), root=0
    )

    # --- Data: rank 0 tokenizes once into the HDF5 cache; every rank reads its own rows.
    cache = _prepare_cache(cfg, world)
    info = collectively(world, lambda: _read_info_everywhere(cache))
    n_classes = len(info.label_names)
    plan = collectively(world, lambda: _plan_federation(cfg, world, cache, info))
    all_test_rows = subsample(info.n_test, cfg.test_samples, cfg.seed)
    test_rows = np.array_split(all_test_rows, world.size)[world.rank]

    def load_local_data() -> tuple[dict[int, DeviceRows], DeviceRows]:
        faults.inject(world.rank, 0, "setup")
        train = {
            k: DeviceRows.from_rows(data.read_rows(cache, "train", plan.shards[k]), device)
            for k in plan.my_clients
        }
        return train, DeviceRows.from_rows(data.read_rows(cache, "test", test_rows), device)

    local_train, local_test = collectively(world, load_local_data)
    log(
        world,
        f"data: {sum(plan.sizes)} training examples in {plan.n_clients} {cfg.partition} "
        f"shards of {min(plan.sizes)}-{max(plan.sizes)}, {len(all_test_rows)} test examples, "
        f"{n_classes} classes {info.label_names}",
    )

    # --- Model: identical on every rank, parameters flattened into one buffer.
    model = _load_model(cfg, world, info.label_names)
    model.to(device)
    # A rank with at most one client reduces its parameters in place (one copy of the model
    # less); several clients per rank, or a server optimizer, need a separate payload.
    in_place = len(plan.my_clients) <= 1 and cfg.server_opt == "fedavg"
    n_metrics = 3  # loss sum, examples seen, stop votes
    flat = FlatParameters(model, tail=1 + n_metrics if in_place else 0)
    log(
        world,
        f"model: {cfg.model} ({type(model).__name__}, {flat.numel / 1e6:.1f}M trainable "
        f"parameters, {flat.numel * 4 / 2**20:.0f} MiB Allreduce payload)",
    )

    # --- Round state, allocated once.
    aggregator = WeightedAllreduce(
        world, flat.numel, device, n_metrics, in_place=flat.storage if in_place else None
    )
    hyper = ServerHyper(
        cfg.server_lr, cfg.server_momentum, cfg.server_beta1, cfg.server_beta2, cfg.server_tau
    )
    server = ServerOptimizer(cfg.server_opt, hyper, flat.buffer)
    round_start = torch.empty_like(flat.buffer)  # the global model each round starts from
    anchor = flat.views(round_start) if cfg.prox_mu > 0 else None
    kept_optimizers: dict[int, torch.optim.Optimizer] = {}
    diagnostics = UpdateDiagnostics(flat, plan.n_clients)
    checkpoint_path = out_dir / checkpoint.CHECKPOINT_NAME
    rounds_done = _resume(cfg, world, checkpoint_path, flat, server) if resuming else 0
    writer = _open_results(
        cfg, world, out_dir, info.label_names, plan, diagnostics.group_names, rounds_done
    )

    def save_checkpoint(round_done: int, params: torch.Tensor) -> None:
        if world.is_root:
            state = {k: v.cpu().numpy() for k, v in server.state().items()}
            checkpoint.save(
                checkpoint_path, cfg, checkpoint.Checkpoint(round_done, params.cpu().numpy(), state)
            )

    scores = None
    for round_ in range(rounds_done + 1, cfg.rounds + 1):
        t_round = time.perf_counter()
        cohort = sample_cohort(plan.n_clients, cfg.cohort_size(world.size), cfg.seed, round_)
        active = [k for k in plan.my_clients if k in cohort]

        # Local training: each of this rank's active clients starts from the global model.
        aggregator.reset()
        diagnostics.start_round()
        round_start.copy_(flat.buffer)
        for i, client in enumerate(active):
            faults.inject(world.rank, round_, "train")
            if stop.requested:
                break
            if i > 0:
                flat.buffer.copy_(round_start)
            optimizer = kept_optimizers.get(client)
            if optimizer is None:
                optimizer = make_optimizer(cfg, flat.params)
                if cfg.keep_local_opt:
                    kept_optimizers[client] = optimizer
            result = train_client(
                model,
                flat.params,
                local_train[client],
                cfg,
                client_seed(cfg.seed, client, round_),
                optimizer,
                anchor,
                progress=lambda step, total, loss, c=client, r=round_: log(
                    world, f"round {r}/{cfg.rounds} client {c}: step {step}/{total} loss {loss:.4f}"
                ),
                should_stop=lambda: stop.requested,
            )
            if result.stopped:
                break
            if faults.should_fail(world.rank, round_, "nan"):
                flat.buffer.fill_(float("nan"))
            if not diagnostics.record_client(client, flat.buffer, round_start):
                _nonfinite(cfg, world, client, round_)
                continue
            aggregator.add(
                flat.buffer, plan.weights[client], [result.loss_sum, result.samples_seen, 0]
            )
        _synchronize(device)
        t_trained = time.perf_counter()

        # Aggregation: wait (sleeping) for the slowest rank, one Allreduce, the server step.
        faults.inject(world.rank, round_, "aggregate")
        aggregator.add_metrics([0, 0, float(stop.requested)])
        wait_for_all(world)
        t_ready = time.perf_counter()
        weighted_sum, total_weight, (loss_sum, samples_seen, stop_votes) = aggregator.allreduce()
        if stop_votes > 0:  # some rank was signalled: this round is void, keep the last one
            flat.buffer.copy_(round_start)
            save_checkpoint(round_ - 1, flat.buffer)
            wait_for_all(world)  # nobody exits (and gets the job killed) before it is written
            log(
                world,
                f"preempted in round {round_}: checkpoint of round {round_ - 1} in "
                f"{checkpoint_path}; exiting with {EXIT_PREEMPTED} (rerun to resume)",
            )
            raise SystemExit(EXIT_PREEMPTED)
        mean_update = diagnostics.mean_update_sample(weighted_sum, total_weight, round_start)
        server.step(flat.buffer, round_start, weighted_sum, total_weight)
        _synchronize(device)
        t_aggregated = time.perf_counter()
        health = diagnostics.finish_round(world, cohort, mean_update, flat.buffer, round_start)
        t_diagnosed = time.perf_counter()

        # Evaluation of the new global model, sharded over ranks.
        evaluated = round_ % cfg.eval_every == 0 or round_ == cfg.rounds
        faults.inject(world.rank, round_, "eval")
        scores = (
            evaluate(model, local_test, n_classes, cfg.eval_batch_size, world, cfg.precision)
            if evaluated
            else None
        )
        t_evaluated = time.perf_counter()

        row = {
            "round": round_,
            "clients/cohort": np.isin(np.arange(plan.n_clients), cohort).astype(np.int8),
            "metrics/train_loss": loss_sum / samples_seen,
            "metrics/test_accuracy": scores.accuracy if scores else np.nan,
            "metrics/test_loss": scores.loss if scores else np.nan,
            "metrics/test_macro_f1": scores.macro_f1 if scores else np.nan,
            "timing/train_s": t_trained - t_round,
            "timing/wait_s": t_ready - t_trained,
            "timing/allreduce_s": t_aggregated - t_ready,
            "timing/diagnostics_s": t_diagnosed - t_aggregated,
            "timing/eval_s": t_evaluated - t_diagnosed,
            "timing/round_s": t_evaluated - t_round,
            **health,
        }
        if cfg.verify_sync:
            row["sync/param_crc32"] = _verify_identical(flat.buffer, world)
        if writer is not None:
            faults.inject(world.rank, round_, "results")
            writer.append(row)
        if cfg.checkpoint_every and round_ % cfg.checkpoint_every == 0:
            save_checkpoint(round_, flat.buffer)
        log(world, _round_summary(round_, cfg.rounds, row))

    # --- Finish.
    if writer is not None:
        writer.close()
        if cfg.save_model:
            _save_model(model, cfg, out_dir / "model")
    if rounds_done >= cfg.rounds:
        log(world, f"the checkpoint already holds all {cfg.rounds} rounds: nothing to train")
    final = f"final test accuracy {scores.accuracy:.4f}, " if scores else ""
    log(world, f"done: {final}results in {out_dir / RESULTS_NAME}")


@dataclass
class FederationPlan:
    """Who trains what. Computed identically on every rank from (config, seed) alone."""

    n_clients: int
    shards: list[np.ndarray]  # training rows of each client
    sizes: list[int]
    weights: list[float]  # FedAvg weight of each client
    label_histogram: np.ndarray  # (clients, classes)
    client_rank: list[int]
    my_clients: list[int]


def _plan_federation(
    cfg: Config, world: World, cache: Path, info: data.CacheInfo
) -> FederationPlan:
    n_clients = cfg.num_clients(world.size)
    n_classes = len(info.label_names)
    rows = subsample(info.n_train, cfg.train_samples, cfg.seed)
    if len(rows) < n_clients:
        raise UsageError(
            f"{len(rows)} training examples cannot give each of {n_clients} clients one"
        )
    spec = PartitionSpec.parse(cfg.partition)
    labels = data.read_column(cache, "train", "labels")
    groups = data.read_groups(cache, spec.column) if spec.kind == "by" else None
    try:
        shards = make_shards(
            spec, rows, labels[rows], None if groups is None else groups[rows], n_clients, cfg.seed
        )
    except ValueError as exc:
        raise UsageError(f"--partition {cfg.partition}: {exc}") from None
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
    )


def _prepare_cache(cfg: Config, world: World) -> Path:
    """Rank 0 loads and tokenizes the corpus once (or finds it cached); all get the path."""

    def build() -> Path | None:
        if not world.is_root:
            return None
        tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
        path = data.cache_path(cfg, tokenizer)
        if path.exists():
            log(world, f"data: cached tokens {path}")
        else:
            log(world, f"data: loading {cfg.dataset!r}, tokenizing into {path}")
            data.build_cache(cfg, tokenizer, path, progress=lambda msg: log(world, f"data: {msg}"))
        return path

    return Path(world.comm.bcast(collectively(world, build), root=0))


def _load_model(cfg: Config, world: World, label_names: list[str]) -> torch.nn.Module:
    """Rank 0 loads first (it may download), then the others from the local cache; rank 0's
    initial weights are then broadcast so every rank starts identical even where random
    initialisation differs between hosts."""

    def load() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        model = models.load_model(cfg.model, label_names, cfg.trust_remote_code)
        limit = models.max_positions(model)
        if limit is not None and cfg.max_seq_len > limit:
            raise UsageError(
                f"--max-seq-len {cfg.max_seq_len} exceeds the model's {limit} positions"
            )
        return model

    model = None
    for rank_zero_phase in (True, False):
        loaded = collectively(
            world, lambda first=rank_zero_phase: load() if world.is_root == first else None
        )
        if loaded is not None:
            model = loaded
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    vector = torch.nn.utils.parameters_to_vector(params).detach().contiguous()
    world.comm.Bcast(vector.numpy(), root=0)
    torch.nn.utils.vector_to_parameters(vector, params)
    return model


def _open_results(
    cfg: Config,
    world: World,
    out_dir: Path,
    label_names: list[str],
    plan: FederationPlan,
    layer_groups: list[str],
    rounds_done: int,
) -> ResultsWriter | None:
    if not world.is_root:
        return None
    if rounds_done and (out_dir / RESULTS_NAME).exists():
        return ResultsWriter.reopen(out_dir / RESULTS_NAME, rounds_done)
    return ResultsWriter(
        out_dir / RESULTS_NAME,
        cfg,
        label_names,
        static={
            "clients/sizes": np.asarray(plan.sizes),
            "clients/rank": np.asarray(plan.client_rank),
            "clients/label_histogram": plan.label_histogram,
        },
        attrs={
            "num_clients": plan.n_clients,
            "world_size": world.size,
            "layer_groups": json.dumps(layer_groups),
        },
    )


def _resume(
    cfg: Config, world: World, path: Path, flat: FlatParameters, server: ServerOptimizer
) -> int:
    """Load OUTPUT's checkpoint on rank 0 (verified), broadcast it, return rounds done."""
    loaded = collectively(
        world, lambda: checkpoint.load(path, cfg, flat.numel) if world.is_root else None
    )
    rounds_done = world.comm.bcast(loaded.round if loaded else None, root=0)
    names = world.comm.bcast(sorted(loaded.server_state) if loaded else None, root=0)
    arrays = {"params": loaded.params} if loaded else {"params": np.empty(flat.numel, np.float32)}
    for name in names:
        arrays[name] = loaded.server_state[name] if loaded else np.empty(flat.numel, np.float32)
    for array in arrays.values():
        world.comm.Bcast(array, root=0)
    flat.buffer.copy_(torch.from_numpy(arrays.pop("params")))
    server.load_state(
        {name: torch.from_numpy(a).to(flat.buffer.device) for name, a in arrays.items()}
    )
    log(
        world,
        f"resuming from {path}: {rounds_done} rounds done"
        + (" (local optimizer states restart from zero)" if cfg.keep_local_opt else ""),
    )
    return rounds_done


def _nonfinite(cfg: Config, world: World, client: int, round_: int) -> None:
    message = f"client {client} produced non-finite parameters in round {round_}"
    if cfg.on_nonfinite == "abort":
        raise RuntimeError(f"{message} (--on-nonfinite skip would drop it and go on)")
    print(f"[fedmpi] rank {world.rank}: {message}: skipped (weight 0)", flush=True)


def _output_dir(cfg: Config) -> str:
    if cfg.output:
        return str(Path(cfg.output).expanduser())
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = "-".join(Path(x).name.replace("_", "-") for x in (cfg.model, cfg.dataset))
    return str(Path("runs") / f"{stamp}-{slug}")


def _check_output(out_dir: Path, cfg: Config) -> bool:
    """Whether this run resumes from OUTPUT's checkpoint; refuses to clobber results."""
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
    if cfg.overwrite and has_checkpoint:
        (out_dir / checkpoint.CHECKPOINT_NAME).unlink()  # never resume a replaced run later
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".fedmpi-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output directory {out_dir} is not writable: {exc.strerror}") from exc
    return has_checkpoint and not cfg.overwrite


def _read_info_everywhere(cache: Path) -> data.CacheInfo:
    if not cache.exists():
        raise UsageError(
            f"the token cache {cache} written by rank 0 is not visible here: put "
            "--cache-dir on a filesystem that every node shares"
        )
    return data.read_info(cache)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _verify_identical(buffer: torch.Tensor, world: World) -> np.ndarray:
    """Every rank's CRC32 of its parameter bytes; raises if any rank differs."""
    mine = np.array([zlib.crc32(buffer.detach().cpu().numpy().view(np.uint8))], dtype=np.int64)
    every = np.empty(world.size, dtype=np.int64)
    world.comm.Allgather(mine, every)
    if len(set(every.tolist())) != 1:
        raise RuntimeError(
            f"ranks hold different global parameters after aggregation: {every.tolist()}"
        )
    return every


def _round_summary(round_: int, rounds: int, row: dict) -> str:
    accuracy = row["metrics/test_accuracy"]
    test = (
        ""
        if np.isnan(accuracy)
        else (
            f"test acc {accuracy:.4f} f1 {row['metrics/test_macro_f1']:.4f} "
            f"loss {row['metrics/test_loss']:.4f} | "
        )
    )
    return (
        f"round {round_}/{rounds} | train loss {row['metrics/train_loss']:.4f} | {test}"
        f"{row['timing/round_s']:.1f}s (train {row['timing/train_s']:.1f}, wait "
        f"{row['timing/wait_s']:.2f}, allreduce {row['timing/allreduce_s']:.3f}, eval "
        f"{row['timing/eval_s']:.1f})"
    )


def _save_model(model: torch.nn.Module, cfg: Config, path: Path) -> None:
    """A Hugging Face directory (safetensors) loadable with ``from_pretrained``.

    The state dict is cloned: the parameters are views into one flat buffer, and
    safetensors refuses (or transformers de-duplicates) tensors that share storage.
    """
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    model.save_pretrained(path, state_dict=state)
    models.load_tokenizer(cfg.model, cfg.trust_remote_code).save_pretrained(path)
