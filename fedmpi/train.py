"""The federated run, top to bottom: set-up (``fedmpi.prepare``), then the round loop.

A round is: the round's cohort of clients is drawn (the same on every rank); every rank
trains its clients in the cohort locally from the same global model, adding
``(w_k / W) * theta_k`` to one payload; one Allreduce sums the payload over ranks, which
leaves the weighted average on every rank; every rank applies the same server step; the
test set is evaluated shard-wise with one more small Allreduce.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from mpi4py import MPI

from fedmpi import checkpoint, faults, models, provenance
from fedmpi.client import LocalOptimizers, client_seed, train_client
from fedmpi.comm import World, log, wait_for_all
from fedmpi.config import Config
from fedmpi.diagnostics import UpdateDiagnostics
from fedmpi.evaluate import EvalResult, evaluate, evaluate_clients, metrics_from_counts
from fedmpi.fedavg import RoundTotals, WeightedAllreduce, reduces_in_place
from fedmpi.flat import flat_zeros
from fedmpi.partition import round_cohort
from fedmpi.preemption import EXIT_PREEMPTED, EXIT_STALLED, StopRequest
from fedmpi.prepare import FederationPlan, Job, prepare
from fedmpi.privacy import ClientLevelDP, poisson_cohort
from fedmpi.results import RESULTS_NAME, ResultsWriter
from fedmpi.resume import Checkpointer
from fedmpi.server import ServerHyper, ServerOptimizer


def run(cfg: Config, world: World) -> None:
    stop = StopRequest()  # first: a preemption signal during set-up must not kill the rank
    stop.install()
    job = prepare(cfg, world)
    model, flat, plan, device = job.model, job.flat, job.plan, job.device
    n_classes = len(job.info.label_names)

    # --- Round state, allocated once.
    dp = ClientLevelDP(cfg, len(plan.participants)) if cfg.dp_clip is not None else None
    in_place = reduces_in_place(len(plan.my_clients), cfg.server_opt, dp is not None)
    aggregator = WeightedAllreduce(
        world, flat.numel, device, in_place=flat.storage if in_place else None
    )
    server = ServerOptimizer(cfg.server_opt, ServerHyper.from_config(cfg), flat.buffer)
    round_start = flat_zeros(flat.numel, device)  # the global model each round starts from
    anchor = flat.views(round_start) if cfg.prox_mu > 0 else None  # FedProx
    optimizers = LocalOptimizers(cfg, flat.params)
    diagnostics = UpdateDiagnostics(flat, plan.n_clients, cfg.diagnostics)
    identity = checkpoint.fingerprint(
        cfg, plan.n_clients, job.info.content_sha256, models.model_identity(cfg.model)
    )
    stateful = {"server": server, **({"privacy": dp} if dp else {})}
    checkpoints = Checkpointer(
        cfg, world, job.out_dir, identity, plan.my_clients, optimizers, stateful
    )
    rounds_done = checkpoints.resume(flat.buffer) if job.resuming else 0
    has_frozen = any(not p.requires_grad for p in model.parameters())
    frozen = _verify_frozen(model, world) if cfg.verify_sync and has_frozen else None
    writer = _open_results(cfg, world, job, diagnostics.group_names, rounds_done, dp)
    if dp:
        log(
            world,
            f"privacy: DP-FedAvg, clip {dp.bound:g}, noise multiplier {dp.noise:g}, Poisson "
            f"rate {dp.rate:.4g} of {len(plan.participants)} clients (denominator "
            f"{dp.denominator:g}), delta {dp.delta:.3g}; central DP with a trusted aggregator",
        )

    scores = None
    for round_ in range(rounds_done + 1, cfg.rounds + 1):
        clock = PhaseClock(device)
        cohort = _cohort(cfg, world, plan, dp, round_)
        if not flat.is_intact():
            raise RuntimeError("a parameter no longer aliases the flat buffer")

        # Local training: each of this rank's clients in the cohort starts from the global model.
        round_start.copy_(flat.buffer)
        denominator = dp.denominator if dp else sum(plan.weights[k] for k in cohort)
        aggregator.begin_round(denominator, rescale=dp is None)
        diagnostics.start_round()
        clipped = _train_cohort(
            cfg, world, job, round_, cohort, round_start, anchor, optimizers, aggregator,
            diagnostics, dp, stop,
        )  # fmt: skip
        clock.mark("train")

        # Aggregation: wait (sleeping) for the slowest rank, one Allreduce, the server step.
        faults.inject(world.rank, round_, "aggregate")
        if stop.requested:
            aggregator.vote_stop()
        wait_for_all(world)
        clock.mark("wait")
        totals = aggregator.allreduce()
        if totals.stop_votes > 0:  # some rank was signalled: this round is void
            flat.buffer.copy_(round_start)
            _preempted(world, checkpoints, round_, flat.buffer, resumed=round_ == rounds_done + 1)
        if dp:
            dp.privatise(totals.average, round_start, totals.weight, round_)
        elif not totals.weight > 0:
            raise RuntimeError(f"no client contributed to round {round_} (all were skipped)")
        diagnostics.observe_average(totals.average, denominator, round_start)
        server.step(flat.buffer, round_start, totals.average)
        clock.mark("allreduce")
        health = diagnostics.finish_round(world, cohort, flat.buffer, round_start)
        clock.mark("diagnostics")

        # Evaluation of the new global model, sharded over ranks.
        faults.inject(world.rank, round_, "eval")
        scores, evaluated = None, {}
        if round_ % cfg.eval_every == 0 or round_ == cfg.rounds:
            scores = evaluate(
                model, job.local_test, n_classes, cfg.eval_batch_size, world, job.precision
            )
            if job.local_val is not None:  # --val-samples: what choices are made on
                val = evaluate(
                    model, job.local_val, n_classes, cfg.eval_batch_size, world, job.precision
                )
                evaluated.update(_scores_row("val", val))
            if plan.eval_rows:
                evaluated.update(_evaluate_clients(cfg, world, job, n_classes))
        clock.mark("eval")

        row = _round_row(
            cfg, world, plan, round_, cohort, totals, scores, evaluated, aggregator, clock,
            health, dp, clipped, flat.buffer,
        )  # fmt: skip
        if writer is not None:
            faults.inject(world.rank, round_, "results")
            writer.append(row)
        if cfg.checkpoint_every and round_ % cfg.checkpoint_every == 0:
            checkpoints.save(round_, flat.buffer)
        log(world, _round_summary(round_, cfg.rounds, row))

    _finish(cfg, world, job, checkpoints, frozen, rounds_done, scores)


def _train_cohort(
    cfg: Config,
    world: World,
    job: Job,
    round_: int,
    cohort: np.ndarray,
    round_start: torch.Tensor,
    anchor: list[torch.Tensor] | None,
    optimizers: LocalOptimizers,
    aggregator: WeightedAllreduce,
    diagnostics: UpdateDiagnostics,
    dp: ClientLevelDP | None,
    stop: StopRequest,
) -> np.ndarray:
    """Train this rank's clients of the cohort one after another, each from the round's
    global model, into the payload; returns their clipped update norms (DP; else zeros).
    Stops early, leaving the round to be voided, when a preemption signal arrives."""
    model, flat, plan = job.model, job.flat, job.plan
    clipped = np.zeros(plan.n_clients)
    for i, client in enumerate(k for k in plan.my_clients if k in cohort):
        faults.inject(world.rank, round_, "train")
        if faults.should_fail(world.rank, round_, "preempt"):
            stop.request()
        if stop.requested:
            break
        if i > 0:
            flat.buffer.copy_(round_start)
        result = train_client(
            model,
            flat.params,
            job.local_train[client],
            cfg,
            client_seed(cfg.seed, client, round_),
            optimizers.for_client(client),
            anchor,
            progress=lambda step, total, loss, c=client: log(
                world,
                f"round {round_}/{cfg.rounds} client {c}: step {step}/{total} loss {loss:.4f}",
            ),
            should_stop=lambda: stop.requested,
            compute=job.precision,
        )
        if result.stopped:
            break
        if faults.should_fail(world.rank, round_, "nan"):
            flat.buffer.fill_(float("nan"))
        weight = plan.weights[client]
        norm = diagnostics.record_client(client, weight, flat.buffer, round_start)
        if norm is None:
            _nonfinite(cfg, world, client, round_)
            continue
        if dp:
            clipped[client] = dp.clip(flat.buffer, round_start, norm)
        aggregator.add(flat.buffer, weight, result.loss_sum, result.samples_seen)
    return clipped


def _round_row(
    cfg: Config,
    world: World,
    plan: FederationPlan,
    round_: int,
    cohort: np.ndarray,
    totals: RoundTotals,
    scores: EvalResult | None,
    evaluated: dict,
    aggregator: WeightedAllreduce,
    clock: PhaseClock,
    health: dict,
    dp: ClientLevelDP | None,
    clipped: np.ndarray,
    params: torch.Tensor,
) -> dict:
    """The round's row of results.h5 (every rank computes it; rank 0 writes it)."""
    row = {
        "round": round_,
        "clients/cohort": np.isin(np.arange(plan.n_clients), cohort).astype(np.int8),
        "metrics/train_loss": totals.loss_sum / totals.examples if totals.examples else np.nan,
        "metrics/test_accuracy": np.nan,  # every row has the test metrics, NaN if not scored
        "metrics/test_loss": np.nan,
        "metrics/test_macro_f1": np.nan,
        **(_scores_row("test", scores) if scores else {}),
        "comm/payload_bytes": aggregator.nbytes,
        **evaluated,
        **clock.seconds(),
        **health,
    }
    if dp:
        row["privacy/epsilon"] = dp.epsilon()
        row["privacy/clipped_update_norm"] = _gather_clipped(world, cohort, clipped, health)
    if cfg.verify_sync:
        row["sync/param_crc32"] = _verify_identical(params, world)
    return row


def _scores_row(split: str, scores: EvalResult) -> dict:
    """``metrics/{split}_*`` of one evaluation, with its confusion matrix (true x predicted
    counts), from which every outcome rule of the report can be recomputed."""
    return {
        f"metrics/{split}_accuracy": scores.accuracy,
        f"metrics/{split}_loss": scores.loss,
        f"metrics/{split}_macro_f1": scores.macro_f1,
        f"metrics/{split}_confusion": scores.confusion,
    }


def _finish(
    cfg: Config,
    world: World,
    job: Job,
    checkpoints: Checkpointer,
    frozen: int | None,
    rounds_done: int,
    scores: EvalResult | None,
) -> None:
    """After the last round: the frozen base checked, the checkpoint left as documented,
    the model saved if asked."""
    if frozen is not None:
        if _verify_frozen(job.model, world) != frozen:
            raise RuntimeError("the frozen weights changed during training")
        log(world, f"frozen weights unchanged on every rank (CRC32 {frozen:08x})")
    checkpoints.finish(max(rounds_done, cfg.rounds), job.flat.buffer)
    if world.is_root and cfg.save_model:
        _save_model(job.model, job.flat.storage, cfg, job.out_dir / "model")
    if rounds_done >= cfg.rounds:
        log(world, f"the checkpoint already holds all {cfg.rounds} rounds: nothing to train")
    final = f"final test accuracy {scores.accuracy:.4f}, " if scores else ""
    log(world, f"done: {final}results in {job.out_dir / RESULTS_NAME}")


def _cohort(
    cfg: Config, world: World, plan: FederationPlan, dp: ClientLevelDP | None, round_: int
) -> np.ndarray:
    """The round's clients, the same on every rank: Poisson-sampled under DP (what the
    accountant assumes), else a fixed-size draw among the clients that may train."""
    if dp:
        return poisson_cohort(plan.participants, dp.rate, cfg.seed, round_)
    return round_cohort(plan.participants, cfg.cohort_size(world.size), cfg.seed, round_)


def _evaluate_clients(cfg: Config, world: World, job: Job, n_classes: int) -> dict:
    """Per-client accuracy on each client's own rows, and the pooled accuracy of the
    clients that trained (their local test sets) and of those that never did."""
    counts = evaluate_clients(
        job.model,
        job.client_eval,
        job.plan.n_clients,
        n_classes,
        cfg.eval_batch_size,
        world,
        job.precision,
    )
    accuracy = np.full(job.plan.n_clients, np.nan)
    for client in job.plan.eval_rows:
        if counts[client, :-1].sum():
            accuracy[client] = metrics_from_counts(counts[client], n_classes).accuracy
    row = {"clients/test_accuracy": accuracy}
    holdout = job.plan.holdout.astype(bool)
    for name, members in (("client_test", ~holdout), ("holdout", holdout)):
        pooled = counts[members & np.isin(np.arange(job.plan.n_clients), list(job.plan.eval_rows))]
        if len(pooled) and pooled[:, :-1].sum():
            scores = metrics_from_counts(pooled.sum(axis=0), n_classes)
            row[f"metrics/{name}_accuracy"] = scores.accuracy
            row[f"metrics/{name}_macro_f1"] = scores.macro_f1
    return row


def _gather_clipped(
    world: World, cohort: np.ndarray, clipped: np.ndarray, health: dict
) -> np.ndarray:
    """Every client's clipped update norm (NaN for clients not in the cohort or skipped)."""
    world.comm.Allreduce(MPI.IN_PLACE, clipped, op=MPI.SUM)
    absent = ~np.isin(np.arange(len(clipped)), cohort) | (health["clients/skipped"] > 0)
    return np.where(absent, np.nan, clipped)


class PhaseClock:
    """Seconds per phase of a round (rank 0's view), synchronising the GPU at each mark."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases[phase] = now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        return {
            **{f"timing/{phase}_s": s for phase, s in self.phases.items()},
            "timing/round_s": self.last - self.start,
        }


def _open_results(
    cfg: Config,
    world: World,
    job: Job,
    layer_groups: list[str],
    rounds_done: int,
    dp: ClientLevelDP | None,
) -> ResultsWriter | None:
    """Rank 0's results file: new, or the resumed run's, continued."""
    if not world.is_root:
        return None
    revision = provenance.code_revision()
    attrs = {
        "config": cfg.to_json(),
        "label_names": json.dumps(job.info.label_names),
        "num_clients": job.plan.n_clients,
        "world_size": world.size,
        "layer_groups": json.dumps(layer_groups),
        "code_revision": revision,
        "data_sha256": job.info.content_sha256,
        "how_split": job.info.how_split,
        **job.test_identity,
        **(
            {"dp_delta": dp.delta, "dp_sample_rate": dp.rate, "dp_denominator": dp.denominator}
            if dp
            else {}
        ),
    }
    plan = job.plan
    static = {
        "clients/sizes": np.asarray(plan.sizes),
        "clients/rank": np.asarray(plan.client_rank),
        "clients/label_histogram": plan.label_histogram,
        "clients/holdout": plan.holdout,
        "clients/eval_sizes": np.array(
            [len(plan.eval_rows.get(k, ())) for k in range(plan.n_clients)]
        ),
    }
    launch = {
        "config": json.loads(cfg.to_json()),
        "code_revision": revision,
        "world_size": world.size,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = job.out_dir / RESULTS_NAME
    if rounds_done and path.exists():
        return ResultsWriter.reopen(path, rounds_done, attrs, static, launch)
    return ResultsWriter(path, attrs, static, launch)


def _preempted(
    world: World, checkpoints: Checkpointer, round_: int, params: torch.Tensor, resumed: bool
) -> NoReturn:
    """Checkpoint the last finished round and exit 75 (requeue), unless this is the
    launches' third preemption in a row in the same round: then a single round outlasts
    the time limit, and requeueing again would loop forever."""
    exact = checkpoints.save_preempted(round_ - 1, params)
    stalled = checkpoints.count_stalled_launches(round_ - 1) if resumed else 1
    limit = checkpoints.max_stalled_launches()
    if stalled >= limit:
        log(
            world,
            f"error: round {round_} was cut short in {stalled} launches in a row without "
            "finishing: one round takes longer than the job's time limit. Not requeueing: "
            "raise the limit (sbatch --time) or shorten a round (fewer examples or local "
            f"epochs per client); the checkpoint of round {round_ - 1} stays in "
            f"{checkpoints.path}",
        )
        raise SystemExit(EXIT_STALLED)
    log(
        world,
        f"preempted in round {round_}: checkpoint of round {round_ - 1} in {checkpoints.path}"
        + ("" if exact else " (clients that trained in the void round keep its state)")
        + f"; exiting with {EXIT_PREEMPTED} (rerun to resume)",
    )
    raise SystemExit(EXIT_PREEMPTED)


def _nonfinite(cfg: Config, world: World, client: int, round_: int) -> None:
    message = f"client {client} produced non-finite parameters in round {round_}"
    if cfg.on_nonfinite == "abort":
        raise RuntimeError(f"{message} (--on-nonfinite skip would drop it and go on)")
    print(f"[fedmpi] rank {world.rank}: {message}: skipped (weight 0)", flush=True)


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


def _verify_frozen(model: torch.nn.Module, world: World) -> int:
    """The CRC32 of the frozen weights (the LoRA base), the same on every rank or an error:
    they are loaded once per rank and never communicated."""
    crc = 0
    for param in model.parameters():
        if not param.requires_grad:
            crc = zlib.crc32(param.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
    every = world.comm.allgather(crc)  # once per run, a few bytes
    if len(set(every)) != 1:
        raise RuntimeError(f"ranks hold different frozen weights: CRC32s {every}")
    return crc


def _round_summary(round_: int, rounds: int, row: dict) -> str:
    accuracy = row["metrics/test_accuracy"]
    test = (
        ""
        if math.isnan(accuracy)
        else (
            f"test acc {accuracy:.4f} f1 {row['metrics/test_macro_f1']:.4f} "
            f"loss {row['metrics/test_loss']:.4f} | "
        )
    )
    val = row.get("metrics/val_accuracy", math.nan)
    test += "" if math.isnan(val) else f"val acc {val:.4f} | "
    privacy = f"epsilon {row['privacy/epsilon']:.3g} | " if "privacy/epsilon" in row else ""
    return (
        f"round {round_}/{rounds} | train loss {row['metrics/train_loss']:.4f} | {test}{privacy}"
        f"{row['timing/round_s']:.1f}s (train {row['timing/train_s']:.1f}, wait "
        f"{row['timing/wait_s']:.2f}, allreduce {row['timing/allreduce_s']:.3f}, eval "
        f"{row['timing/eval_s']:.1f})"
    )


def _save_model(model: torch.nn.Module, buffer: torch.Tensor, cfg: Config, path: Path) -> None:
    """A Hugging Face directory loadable with ``from_pretrained``: the whole model, or under
    LoRA a peft adapter (with the head) that ``PeftModel.from_pretrained`` puts on the base.

    Tensors in the flat ``buffer`` are cloned: they are views into one storage, which
    safetensors refuses (or transformers de-duplicates).
    """
    shared = buffer.untyped_storage().data_ptr()
    state = {
        name: t.detach().cpu().clone() if t.untyped_storage().data_ptr() == shared else t
        for name, t in model.state_dict().items()
    }
    model.save_pretrained(path, state_dict=state)
    models.load_tokenizer(cfg.model, cfg.trust_remote_code).save_pretrained(path)
