"""One federated round, as an object that owns the round's state and runs its phases in
the order of the algorithm:

    cohort -> local training -> aggregation (one Allreduce) -> server step -> evaluation

``FederatedRound.run(round_)`` is FedAvg as written in a paper: the cohort is drawn (the
same on every rank); every rank trains its clients in the cohort one after another, each
from the round's global model, adding ``(w_k / W) * theta_k`` to one payload; one
Allreduce sums the payload over ranks, which leaves the weighted average on every rank;
every rank applies the same server step; the new model is scored shard-wise. Features that
act per round (privacy, diagnostics, FedProx, ...) are ``fedmpi.hooks.RoundHook``s called
at fixed points of these phases, not branches in them. ``fedmpi.train`` runs the rounds;
the benchmarks time this same object.
"""

from __future__ import annotations

import math
import time
import zlib

import numpy as np
import torch

from fedmpi import faults
from fedmpi import results_keys as rk
from fedmpi.allreduce import RoundTotals, WeightedAllreduce, reduces_in_place
from fedmpi.client import LocalOptimizers, client_seed, train_client
from fedmpi.comm import World, log, wait_for_all
from fedmpi.config import Config
from fedmpi.evaluate import EvalResult, evaluate, evaluate_clients, metrics_from_counts
from fedmpi.flat import flat_zeros
from fedmpi.hooks import RoundContext, RoundHook, overrides
from fedmpi.partition import round_cohort
from fedmpi.preemption import StopRequest
from fedmpi.prepare import Job
from fedmpi.server import ServerHyper, ServerOptimizer
from fedmpi.sparse_wire import SparseAllgather, wire_choice


class RoundVoided(Exception):
    """A rank was asked to stop (preemption) during the round: every rank learned it from
    the Allreduce, the parameters are back at the round's start, and the round is void."""

    def __init__(self, round_: int) -> None:
        super().__init__(f"round {round_} was cut short by a stop request")
        self.round = round_


class FederatedRound:
    """The round's state, allocated once per run: the global model each round starts from,
    the aggregation buffer, the server optimizer, the clients' local optimizers, the hooks
    and the clock. ``run`` is one round; ``scores`` is the latest evaluation."""

    def __init__(
        self, cfg: Config, world: World, job: Job, hooks: list[RoundHook], stop: StopRequest
    ) -> None:
        self.cfg, self.world, self.job, self.hooks, self.stop = cfg, world, job, hooks, stop
        flat = job.flat
        self.fixed_denominator = next(
            (h.fixed_denominator for h in hooks if h.fixed_denominator is not None), None
        )
        self.start = flat_zeros(flat.numel, job.device)  # the global model a round starts from
        self.aggregator: WeightedAllreduce | SparseAllgather
        cohort = cfg.cohort_size(world.size) or len(job.plan.participants)
        if wire_choice(cfg.compress, world, -(-cohort // world.size)) == "sparse":
            self.aggregator = SparseAllgather(world, self.start)
        else:
            in_place = reduces_in_place(
                len(job.plan.my_clients), cfg.server_opt, self.fixed_denominator is not None
            )
            self.aggregator = WeightedAllreduce(
                world, flat.numel, job.device, in_place=flat.storage if in_place else None
            )
        self.server = ServerOptimizer(cfg.server_opt, ServerHyper.from_config(cfg), flat.buffer)
        self.optimizers = LocalOptimizers(cfg, flat.params)
        self.step_hooks = [h.adjust_gradients for h in hooks if overrides(h, "adjust_gradients")]
        self.scores: EvalResult | None = None

    # ------------------------------------------------------------------ the round

    def run(self, round_: int) -> dict:
        """One round; returns its results row (the same on every rank). Raises
        RoundVoided when a stop request cut it short."""
        clock = PhaseClock(self.job.device)
        ctx = self.begin(round_)
        self.train_cohort(ctx)
        clock.mark("train")
        totals = self.aggregate(ctx, clock)
        for hook in self.hooks:
            hook.after_server_step(ctx)
        clock.mark("diagnostics")
        evaluated = self.evaluate(round_)
        clock.mark("eval")
        return self.row(ctx, totals, evaluated, clock)

    def begin(self, round_: int) -> RoundContext:
        """Draw the cohort and open the payload; every hook hears of the round."""
        cfg, plan = self.cfg, self.job.plan
        cohort = next((c for c in (h.cohort(round_) for h in self.hooks) if c is not None), None)
        if cohort is None:
            cohort = round_cohort(
                plan.participants, cfg.cohort_size(self.world.size), cfg.seed, round_
            )
        if not self.job.flat.is_intact():
            raise RuntimeError("a parameter no longer aliases the flat buffer")
        self.start.copy_(self.job.flat.buffer)
        fixed = self.fixed_denominator
        denominator = fixed if fixed is not None else sum(plan.weights[k] for k in cohort)
        self.aggregator.begin_round(denominator, rescale=fixed is None)
        ctx = RoundContext(
            round_, cohort, self.start, self.job.flat.buffer, denominator, self.world
        )
        for hook in self.hooks:
            hook.start(ctx)
        return ctx

    def train_cohort(self, ctx: RoundContext) -> None:
        """Train this rank's clients of the cohort one after another, each from the round's
        global model, into the payload. Stops early, leaving the round to be voided, when
        a preemption signal arrives."""
        cfg, world, job, round_ = self.cfg, self.world, self.job, ctx.round
        flat = job.flat
        in_cohort = set(ctx.cohort.tolist())
        for i, client in enumerate(k for k in job.plan.my_clients if k in in_cohort):
            faults.inject(world.rank, round_, "train")
            if faults.should_fail(world.rank, round_, "preempt"):
                self.stop.request()
            if self.stop.requested:
                break
            if i > 0:
                flat.buffer.copy_(self.start)
            result = train_client(
                job.model,
                job.local_train[client],
                cfg,
                client_seed(cfg.seed, client, round_),
                self.optimizers.for_client(client),
                adjust_gradients=self._adjust_gradients if self.step_hooks else None,
                progress=lambda step, total, loss, c=client: log(
                    world, progress_line(round_, cfg.rounds, c, step, total, loss)
                ),
                should_stop=lambda: self.stop.requested,
                compute=job.precision,
            )
            if result.stopped:
                break
            if faults.should_fail(world.rank, round_, "nan"):
                flat.buffer.fill_(float("nan"))
            self.contribute(ctx, client, result.loss_sum, result.samples_seen)
        self.optimizers.release()  # the clients' shared AdamW state: not held past training

    def contribute(self, ctx: RoundContext, client: int, loss_sum: float, examples: int) -> None:
        """``client``'s trained model (in the parameters) through the hooks, in list order,
        and into the payload with its weight, unless a hook leaves it out."""
        weight = self.job.plan.weights[client]
        norm: float | None = math.nan
        for hook in self.hooks:
            norm = hook.client_update(ctx, client, weight, norm)
            if norm is None:
                self._nonfinite(client, ctx.round)
                return
        self.aggregator.add(self.job.flat.buffer, weight, loss_sum, examples)

    def aggregate(self, ctx: RoundContext, clock: PhaseClock) -> RoundTotals:
        """Wait (sleeping) for the slowest rank, one Allreduce, the hooks on the way out,
        and the server step: the new global model is in the parameters on every rank."""
        faults.inject(self.world.rank, ctx.round, "aggregate")
        if self.stop.requested:
            self.aggregator.vote_stop()
        wait_for_all(self.world)
        clock.mark("wait")
        totals = self.aggregator.allreduce()
        if totals.stop_votes > 0:  # some rank was signalled: this round is void
            self.job.flat.buffer.copy_(self.start)
            raise RoundVoided(ctx.round)
        if self.fixed_denominator is None and not totals.weight > 0:
            raise RuntimeError(f"no client contributed to round {ctx.round} (all were skipped)")
        for hook in reversed(self.hooks):
            hook.after_allreduce(ctx, totals.average, totals.weight)
        self.server.step(self.job.flat.buffer, self.start, totals.average)
        clock.mark("allreduce")
        return totals

    def evaluate(self, round_: int) -> dict:
        """Score the new global model, sharded over ranks, in the rounds that are scored:
        the test set, the validation set (``--val-samples``) and the clients' own rows
        (``--eval-clients``)."""
        cfg, job = self.cfg, self.job
        faults.inject(self.world.rank, round_, "eval")
        self.scores = None
        if round_ % cfg.eval_every and round_ != cfg.rounds:
            return {}
        n_classes = len(job.info.label_names)

        def score(rows) -> EvalResult:
            return evaluate(
                job.model, rows, n_classes, cfg.eval_batch_size, self.world, job.precision
            )

        self.scores = score(job.local_test)
        evaluated = scores_row("test", self.scores)
        if job.local_val is not None:  # --val-samples: what choices are made on
            evaluated.update(scores_row("val", score(job.local_val)))
        if job.plan.eval_rows:
            evaluated.update(self._evaluate_clients(n_classes))
        return evaluated

    def row(
        self, ctx: RoundContext, totals: RoundTotals, evaluated: dict, clock: PhaseClock
    ) -> dict:
        """The round's row of results.h5 (every rank computes it; rank 0 writes it)."""
        n_clients = self.job.plan.n_clients
        row = {
            rk.ROUND: ctx.round,
            rk.COHORT: np.isin(np.arange(n_clients), ctx.cohort).astype(np.int8),
            rk.TRAIN_LOSS: totals.loss_sum / totals.examples if totals.examples else np.nan,
            rk.TEST_ACCURACY: np.nan,  # every row has the test metrics, NaN if not scored
            rk.TEST_LOSS: np.nan,
            rk.TEST_MACRO_F1: np.nan,
            **evaluated,
            rk.PAYLOAD_BYTES: self.aggregator.nbytes,
            **clock.seconds(),
        }
        for hook in self.hooks:
            row.update(hook.row(ctx))
        if self.cfg.verify_sync:
            row[rk.PARAM_CRC32] = verify_identical(self.job.flat.buffer, self.world)
        return row

    # ------------------------------------------------------------------ helpers

    def _adjust_gradients(self) -> None:
        for adjust in self.step_hooks:
            adjust()

    def _nonfinite(self, client: int, round_: int) -> None:
        message = f"client {client} produced non-finite parameters in round {round_}"
        if self.cfg.on_nonfinite == "abort":
            raise RuntimeError(f"{message} (--on-nonfinite skip would drop it and go on)")
        print(f"[fedmpi] rank {self.world.rank}: {message}: skipped (weight 0)", flush=True)

    def _evaluate_clients(self, n_classes: int) -> dict:
        """Per-client accuracy on each client's own rows, and the pooled accuracy of the
        clients that trained (their local test sets) and of those that never did."""
        job = self.job
        plan = job.plan
        counts = evaluate_clients(
            job.model,
            job.client_eval,
            plan.n_clients,
            n_classes,
            self.cfg.eval_batch_size,
            self.world,
            job.precision,
        )
        accuracy = np.full(plan.n_clients, np.nan)
        for client in plan.eval_rows:
            if counts[client, :-1].sum():
                accuracy[client] = metrics_from_counts(counts[client], n_classes).accuracy
        row = {rk.CLIENT_TEST_ACCURACY: accuracy}
        holdout = plan.holdout.astype(bool)
        scored = np.isin(np.arange(plan.n_clients), list(plan.eval_rows))
        for name, members in (("client_test", ~holdout), ("holdout", holdout)):
            pooled = counts[members & scored]
            if len(pooled) and pooled[:, :-1].sum():
                scores = metrics_from_counts(pooled.sum(axis=0), n_classes)
                row[rk.metric(name, "accuracy")] = scores.accuracy
                row[rk.metric(name, "macro_f1")] = scores.macro_f1
        return row


def progress_line(round_: int, rounds: int, client: int, step: int, total: int, loss: float) -> str:
    """Rank 0's report on its client's local training, every 15 s (README.md quotes it)."""
    return f"round {round_}/{rounds} client {client}: step {step}/{total} loss {loss:.4f}"


def scores_row(split: str, scores: EvalResult) -> dict:
    """``metrics/{split}_*`` of one evaluation, with its confusion matrix (true x predicted
    counts), from which every outcome rule of the report can be recomputed."""
    return {
        rk.metric(split, "accuracy"): scores.accuracy,
        rk.metric(split, "loss"): scores.loss,
        rk.metric(split, "macro_f1"): scores.macro_f1,
        rk.metric(split, "confusion"): scores.confusion,
    }


def verify_identical(buffer: torch.Tensor, world: World) -> np.ndarray:
    """Every rank's CRC32 of its parameter bytes; raises if any rank differs."""
    mine = np.array([zlib.crc32(buffer.detach().cpu().numpy().view(np.uint8))], dtype=np.int64)
    every = np.empty(world.size, dtype=np.int64)
    world.comm.Allgather(mine, every)
    if len(set(every.tolist())) != 1:
        raise RuntimeError(
            f"ranks hold different global parameters after aggregation: {every.tolist()}"
        )
    return every


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
            **{rk.timing(phase): s for phase, s in self.phases.items()},
            rk.ROUND_SECONDS: self.last - self.start,
        }
