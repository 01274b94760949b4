"""The federated run, top to bottom: set-up (``fedmpi.prepare``), the round's hooks, then
the loop over rounds (``fedmpi.round.FederatedRound``: cohort, local training, one
Allreduce, server step, evaluation), each round's row written, tracked and checkpointed.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from fedmpi import checkpoint, faults, models, provenance
from fedmpi import results_keys as rk
from fedmpi.checkpointer import Checkpointer
from fedmpi.client import FedProx
from fedmpi.comm import World, collectively, log, root_computes
from fedmpi.compression import UpdateCompression
from fedmpi.config import Config
from fedmpi.diagnostics import UpdateDiagnostics
from fedmpi.errors import UsageError
from fedmpi.evaluate import EvalResult
from fedmpi.hooks import RoundHook
from fedmpi.preemption import EXIT_PREEMPTED, EXIT_STALLED, StopRequest
from fedmpi.prepare import Job, prepare
from fedmpi.privacy import ClientLevelDP, DPFedAvg, shared_noise_key
from fedmpi.results import RESULTS_NAME, ResultsWriter
from fedmpi.round import FederatedRound, RoundVoided
from fedmpi.tracking import Trackers


def run(cfg: Config, world: World) -> None:
    stop = StopRequest()  # first: a preemption signal during set-up must not kill the rank
    stop.install()
    job = prepare(cfg, world)
    model, flat, plan = job.model, job.flat, job.plan

    # --- The round and its hooks, allocated once.
    diagnostics = UpdateDiagnostics(flat, plan.n_clients, cfg.diagnostics)
    dp = (
        ClientLevelDP(cfg, len(plan.participants), shared_noise_key(cfg, world))
        if cfg.dp_clip is not None
        else None
    )
    hooks: list[RoundHook] = [diagnostics]  # first: it measures what the others transform
    # Compression before DP: the clip then bounds the update as it is sent.
    compression = UpdateCompression.from_config(cfg, flat.numel, plan.n_clients, job.device)
    if compression:
        hooks.append(compression)
        log(world, compression.describe())
    if dp:
        hooks.append(DPFedAvg(dp, plan.participants, cfg.seed, plan.n_clients))
    if cfg.prox_mu > 0:
        hooks.append(FedProx(flat, cfg.prox_mu))
    fed_round = FederatedRound(cfg, world, job, hooks, stop)

    identity = checkpoint.fingerprint(
        cfg,
        plan.n_clients,
        job.info.content_sha256,
        root_computes(world, lambda: models.model_identity(cfg.model)),  # reads every weight
    )
    stateful = {"server": fed_round.server, **({"privacy": dp} if dp else {})}
    per_client = {"error_feedback": compression} if compression and cfg.error_feedback else {}
    checkpoints = Checkpointer(
        cfg,
        world,
        job.out_dir,
        identity,
        plan.my_clients,
        fed_round.optimizers,
        stateful,
        per_client,
    )
    rounds_done = checkpoints.resume(flat.buffer) if job.resuming else 0
    has_frozen = any(not p.requires_grad for p in model.parameters())
    frozen = _verify_frozen(model, world) if cfg.verify_sync and has_frozen else None
    trackers = collectively(  # before results.h5: a refused tracker leaves no run behind
        world, lambda: Trackers.open(cfg, world, job, diagnostics.group_names, rounds_done)
    )
    writer = _open_results(cfg, world, job, diagnostics.group_names, rounds_done, dp)
    if dp:
        _log_privacy(cfg, world, job, dp)

    for round_ in range(rounds_done + 1, cfg.rounds + 1):
        try:
            row = fed_round.run(round_)
        except RoundVoided:
            _preempted(world, checkpoints, round_, flat.buffer, resumed=round_ == rounds_done + 1)
        if writer is not None:
            faults.inject(world.rank, round_, "results")
            writer.append(row)
        if trackers is not None:
            trackers.log_round(row)
        if cfg.checkpoint_every and round_ % cfg.checkpoint_every == 0:
            checkpoints.save(round_, flat.buffer)
        log(world, _round_summary(round_, cfg.rounds, row))

    _finish(cfg, world, job, checkpoints, frozen, rounds_done, fed_round.scores)
    if trackers is not None:
        trackers.close()


def _log_privacy(cfg: Config, world: World, job: Job, dp: ClientLevelDP) -> None:
    log(world, dp.describe(len(job.plan.participants)))


def _finish(
    cfg: Config,
    world: World,
    job: Job,
    checkpoints: Checkpointer,
    frozen: int | None,
    rounds_done: int,
    scores: EvalResult | None,
) -> None:
    """After the last round: the frozen base checked, a destroyed model refused, the model
    saved if asked (while a checkpoint of the last round is on disk, so a failed save
    loses nothing), and the checkpoint left as documented."""
    last_round = max(rounds_done, cfg.rounds)
    if frozen is not None:
        if _verify_frozen(job.model, world) != frozen:
            raise RuntimeError("the frozen weights changed during training")
        log(world, f"frozen weights unchanged on every rank (CRC32 {frozen:08x})")
    collectively(world, lambda: _check_final_model(job.flat.buffer, scores, last_round))
    save = functools.partial(
        _save_model, job.model, job.flat.storage, cfg, job.out_dir / models.SAVED_MODEL, last_round
    )
    checkpoints.finish(last_round, job.flat.buffer, save if cfg.save_model else None)
    if rounds_done >= cfg.rounds:
        log(world, f"the checkpoint already holds all {cfg.rounds} rounds: nothing to train")
    final = f"final test accuracy {scores.accuracy:.4f}, " if scores else ""
    log(world, f"done: {final}results in {job.out_dir / RESULTS_NAME}")


def _check_final_model(buffer: torch.Tensor, scores: EvalResult | None, round_: int) -> None:
    """Never call a destroyed model done: non-finite weights or a NaN test loss end the
    job with an error (identical on every rank: the parameters and scores are)."""
    broken = int(buffer.numel() - torch.isfinite(buffer).sum())
    if broken:
        problem = f"holds {broken:,} NaN or infinite weights of {buffer.numel():,}"
    elif scores is not None and not math.isfinite(scores.loss):
        problem = f"has a test loss of {scores.loss}"
    else:
        return
    raise UsageError(
        f"training diverged: the global model after round {round_} {problem}; it is not "
        "saved (results.h5 holds every round): lower --lr or --server-lr and rerun with "
        "--overwrite"
    )


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
        rk.CONFIG: cfg.to_json(),
        rk.LABEL_NAMES: json.dumps(job.info.label_names),
        rk.NUM_CLIENTS: job.plan.n_clients,
        rk.WORLD_SIZE: world.size,
        rk.LAYER_GROUPS: json.dumps(layer_groups),
        rk.CODE_REVISION: revision,
        rk.DATA_SHA256: job.info.content_sha256,
        rk.HOW_SPLIT: job.info.how_split,
        **job.test_identity,
        **(dp.results_attrs() if dp else {}),  # the accountant's inputs, never the key
    }
    plan = job.plan
    static = {
        rk.CLIENT_SIZES: np.asarray(plan.sizes),
        rk.CLIENT_RANK: np.asarray(plan.client_rank),
        rk.CLIENT_LABEL_HISTOGRAM: plan.label_histogram,
        rk.CLIENT_HOLDOUT: plan.holdout,
        rk.CLIENT_EVAL_SIZES: np.array(
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
    """The round's log line (README.md quotes it; tests/test_docs.py checks the quote)."""
    accuracy = row[rk.TEST_ACCURACY]
    test = (
        ""
        if math.isnan(accuracy)
        else (
            f"test acc {accuracy:.4f} f1 {row[rk.TEST_MACRO_F1]:.4f} "
            f"loss {row[rk.TEST_LOSS]:.4f} | "
        )
    )
    val = row.get(rk.VAL_ACCURACY, math.nan)
    test += "" if math.isnan(val) else f"val acc {val:.4f} | "
    privacy = f"epsilon {row[rk.EPSILON]:.3g} | " if rk.EPSILON in row else ""
    seconds = {phase: row[rk.timing(phase)] for phase in ("train", "wait", "allreduce", "eval")}
    return (
        f"round {round_}/{rounds} | train loss {row[rk.TRAIN_LOSS]:.4f} | {test}{privacy}"
        f"{row[rk.ROUND_SECONDS]:.1f}s (train {seconds['train']:.1f}, wait "
        f"{seconds['wait']:.2f}, allreduce {seconds['allreduce']:.3f}, eval "
        f"{seconds['eval']:.1f})"
    )


def _save_model(
    model: torch.nn.Module, buffer: torch.Tensor, cfg: Config, path: Path, round_: int
) -> None:
    """A Hugging Face directory loadable with ``from_pretrained``: the whole model, or under
    LoRA a peft adapter (with the head) that ``PeftModel.from_pretrained`` puts on the base.
    Written whole or not at all (``models.write_directory``); a failure names its cause
    and the rerun that finishes the save from the checkpoint of ``round_``.

    Tensors in the flat ``buffer`` are cloned: they are views into one storage, which
    safetensors refuses (or transformers de-duplicates).
    """
    from safetensors import SafetensorError  # what a full disk raises while writing tensors

    shared = buffer.untyped_storage().data_ptr()
    state = {
        name: t.detach().cpu().clone() if t.untyped_storage().data_ptr() == shared else t
        for name, t in model.state_dict().items()
    }

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state)
        models.load_tokenizer(cfg.model, cfg.trust_remote_code).save_pretrained(folder)

    try:
        models.write_directory(path, write)
    except (OSError, SafetensorError) as exc:
        raise UsageError(
            f"--save-model: cannot write the model to {path} ({exc}); the checkpoint of "
            f"round {round_} stays in {path.parent}: make room and rerun the same command, "
            "which saves it without training again"
        ) from exc
