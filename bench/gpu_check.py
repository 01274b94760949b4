"""fedmpi on one GPU: local training against a plain PyTorch loop, bf16 against fp32, the
round's overhead, memory per rank with and without LoRA, 1, 2 and 4 ranks on one card.

    python bench/gpu_check.py OUTDIR [--dry-run] [--mpiexec MPIEXEC] [--budget-s 330]

``bench/gpu_check.sh`` calls it after recording the environment and running
``tests/test_gpu.py``. It writes ``OUTDIR/gpu_check.md`` (markdown tables, the card named
on every row) and ``OUTDIR/gpu_check.json`` (the raw figures), rewritten after every
section, so a run cut short keeps what it measured. Models are random, built here from
configs (nothing is downloaded); the data are random token rows whose lengths spread over
half to all of the maximum, as text does: timing does not depend on what tokens say.

1. Throughput, in this process: fedmpi's ``train_client`` against bench/throughput.py's
   plain loop on the same BERT-base, rows and batches, in fp32 and under bf16 autocast.
2. Rounds, under ``mpiexec -n 1``, ``2``, ``4`` with every rank on the one GPU: a BERT-base
   (fp32) and a ~1B-parameter Llama (bf16 compute), each fully fine-tuned and with LoRA
   (the Llama's frozen base stored in bf16, as fedmpi keeps a bf16 checkpoint). One
   client per rank, run by the project's own round (``fedmpi.round.FederatedRound.run``
   over a synthetic job from ``bench/rig.py``, with the ``--diagnostics full`` hook), its
   phases as the round's clock times them with the GPU synchronised (``timing/*`` of its
   row: local training, the wait for the other ranks, the Allreduce phase, the
   diagnostics after the server step), the Allreduce phase split into the time inside
   MPI (a communicator that times its Allreduce calls) and the rest (the payload's
   scaling, host staging, the server step, the diagnostics' pass over the average).
   Per rank, the peak of ``torch.cuda.max_memory_allocated`` over the rounds. A case
   that would not fit np copies of its np=1 peak on the card, or a rank count the time
   left cannot cover, is reported as not run.

``--dry-run`` runs every step on the CPU with tiny shapes: it proves the script, and its
figures are not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from runjob import DEFAULT_MPIEXEC, mpiexec_prefix
from throughput import time_loops

from fedmpi.config import Config
from fedmpi.device_rows import DeviceRows

HEADS = ("classifier", "score")  # the new head of BERT and of Llama classifiers
GIB = 2**30


@dataclass(frozen=True)
class Scale:
    """Every size the check uses: the GPU's, or the dry run's tiny ones."""

    bert: dict  # BertConfig overrides (none: BERT-base)
    llama: dict  # LlamaConfig
    seq_len: int
    batch: int  # throughput and BERT rounds
    llama_batch: int
    warmup: int  # throughput steps, untimed, then blocks x steps timed
    steps: int
    blocks: int
    round_steps: int  # local steps per round: BERT, Llama
    llama_round_steps: int
    rounds: int  # per case; the first warms up, the others are averaged
    names: dict  # what the report calls the two models
    nps: tuple[int, ...] = (1, 2, 4)


GPU = Scale(
    bert={},
    llama={
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },  # TinyLlama-1.1B's shape: 1.03B parameters as a classifier (no LM head)
    seq_len=128,
    batch=32,
    llama_batch=8,
    warmup=3,
    steps=10,
    blocks=3,
    round_steps=32,  # 1,024 examples: the paper's round (2 epochs of ~500) at length 128
    llama_round_steps=16,
    rounds=2,
    names={"bert": "BERT-base", "llama": "Llama ~1B"},
)
DRY = Scale(
    bert={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1000,
        "max_position_embeddings": 64,
    },
    llama={
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 64,
    },
    seq_len=16,
    batch=4,
    llama_batch=4,
    warmup=1,
    steps=2,
    blocks=2,
    round_steps=2,
    llama_round_steps=2,
    rounds=2,
    names={"bert": "BERT tiny", "llama": "Llama tiny"},
)


@dataclass(frozen=True)
class Case:
    """One model and way of training it, timed round by round."""

    model: str  # "bert" or "llama"
    peft: str  # "none" or "lora"
    precision: str  # compute precision

    def title(self, scale: Scale) -> str:
        how = "LoRA" if self.peft == "lora" else "full"
        return f"{scale.names[self.model]} {how} {self.precision}"

    @property
    def key(self) -> str:
        return f"{self.model}-{self.peft}"


CASES = (
    Case("bert", "none", "fp32"),
    Case("bert", "lora", "fp32"),
    Case("llama", "none", "bf16"),
    Case("llama", "lora", "bf16"),
)


# ---------------------------------------------------------------------- models and data


def build_model(model: str, scale: Scale, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random classifier built on ``device`` (no host copy of a 1B model), in ``dtype``."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if model == "bert":
        config, cls = BertConfig(**scale.bert, pad_token_id=0), BertForSequenceClassification
    else:
        config, cls = LlamaConfig(**scale.llama, pad_token_id=0), LlamaForSequenceClassification
    config.num_labels = 2
    with torch.device(device):
        return cls(config).to(dtype)


def random_rows(n: int, seq_len: int, vocab: int, seed: int, device: str) -> DeviceRows:
    """``n`` rows of random tokens (never the pad id 0), lengths spread over half to all of
    ``seq_len``, padded with 0 as fedmpi's token cache is, and random binary labels."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=generator)
    ids = torch.randint(1, vocab, (n, seq_len), generator=generator, dtype=torch.int32)
    ids[torch.arange(seq_len)[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, 2, (n,), generator=generator)
    return DeviceRows(ids.to(device), lengths.to(device), labels.to(device))


def card(device: str) -> str:
    """What every figure is labelled with: the GPU's name, or that this was a dry run."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return "CPU dry run (not a measurement)"


# ---------------------------------------------------------------------- 1. throughput


def throughput(scale: Scale, device: str) -> list[dict]:
    """fedmpi's loop and the plain one on the same BERT-base and batches, fp32 then bf16."""
    results = []
    for precision in ("fp32", "bf16"):
        model = build_model("bert", scale, device, torch.float32)
        cfg = Config(batch_size=scale.batch, max_seq_len=scale.seq_len, precision=precision)
        sizes = [scale.warmup * scale.batch] + [scale.steps * scale.batch] * scale.blocks
        blocks = [
            random_rows(n, scale.seq_len, model.config.vocab_size, seed, device)
            for seed, n in enumerate(sizes)
        ]
        seconds = time_loops(model, blocks, cfg)
        examples = scale.steps * scale.batch * scale.blocks
        for loop, s in seconds.items():
            results.append({"precision": precision, "loop": loop, "examples": examples, "s": s})
        del model, blocks
        release(device)
    return results


def release(device: str) -> None:
    """Give freed GPU memory back, so the next model's peak is its own."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- 2. rounds (MPI)


class TimedComm:
    """An MPI communicator that adds up the seconds its Allreduce calls take: the world
    the round runs on, so the Allreduce phase splits into MPI and the rest."""

    def __init__(self, comm) -> None:
        self.comm, self.seconds = comm, 0.0

    def Allreduce(self, *args, **kwargs) -> None:  # mpi4py's name
        start = time.perf_counter()
        self.comm.Allreduce(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str):
        return getattr(self.comm, name)


def mpi_seconds_hook(comm: TimedComm):
    """A round hook, last in the list, that reads ``comm``'s count of the round's payload
    Allreduce: zeroed when the round starts, read first thing after the Allreduce (the way
    out runs the hooks in reverse), before the diagnostics' own small Allreduce."""
    from fedmpi.hooks import RoundHook

    class MpiSeconds(RoundHook):
        seconds = 0.0

        def start(self, ctx) -> None:
            comm.seconds = 0.0

        def after_allreduce(self, ctx, average, arrived) -> None:
            self.seconds = comm.seconds

    return MpiSeconds()


def with_lora(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """fedmpi's LoRA wrapping: adapters and the new head train (fp32), the base is frozen."""
    from fedmpi.adapters import apply_lora

    new = [name for name, _ in model.named_parameters() if name.split(".")[0] in HEADS]
    return apply_lora(model, cfg, new)


class Rig:
    """One case on this rank: the model on the device (a LoRA Llama's base in bf16),
    flattened, and the project's round (``fedmpi.round.FederatedRound``, with the
    ``--diagnostics full`` hook train.py puts first) over a synthetic job whose one
    client per rank trains on this rank's random rows."""

    def __init__(self, world, case: Case, scale: Scale, device: str) -> None:
        from rig import one_client_per_rank

        from fedmpi.allreduce import TAIL
        from fedmpi.diagnostics import UpdateDiagnostics
        from fedmpi.flat import FlatParameters
        from fedmpi.preemption import StopRequest
        from fedmpi.round import FederatedRound

        llama = case.model == "llama"
        batch = scale.llama_batch if llama else scale.batch
        unscored = scale.rounds + 1  # no round run here is a scored one
        self.cfg = Config(
            batch_size=batch,
            lr=1e-5,
            precision=case.precision,
            peft=case.peft,
            diagnostics="full",
            rounds=unscored,
            eval_every=unscored,
        )
        base = torch.bfloat16 if llama and case.peft == "lora" else torch.float32
        self.model = build_model(case.model, scale, device, base)
        if case.peft == "lora":
            self.model = with_lora(self.model, self.cfg)
        self.flat = FlatParameters(self.model, tail=len(TAIL))
        steps = scale.llama_round_steps if llama else scale.round_steps
        vocab = self.model.config.vocab_size
        self.rows = random_rows(steps * batch, scale.seq_len, vocab, world.rank, device)
        self.comm = TimedComm(world.comm)
        timed_world = dataclasses.replace(world, comm=self.comm)
        job = one_client_per_rank(
            timed_world, self.model, self.flat, device, rows=self.rows, precision=case.precision
        )
        diagnostics = UpdateDiagnostics(self.flat, job.plan.n_clients, self.cfg.diagnostics)
        self.mpi = mpi_seconds_hook(self.comm)
        hooks = [diagnostics, self.mpi]
        self.fed_round = FederatedRound(self.cfg, timed_world, job, hooks, StopRequest())
        self.title = case.title(scale)

    def round(self, round_: int) -> dict[str, float]:
        """One round of the project's round (``FederatedRound.run``), its phases as the
        round's clock timed them (``timing/*`` of its row), with the Allreduce's MPI share."""
        return round_phases(self.fed_round.run(round_), self.mpi.seconds)

    def sizes(self) -> dict[str, int]:
        return {
            "trainable": self.flat.numel,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "payload_bytes": self.fed_round.aggregator.nbytes,
            "examples_per_round": len(self.rows) * self.cfg.local_epochs,
        }


def run_case(world, case: Case, scale: Scale, device: str) -> dict:
    """``scale.rounds`` rounds of one case; this rank's mean seconds per phase over the
    rounds after the first (they include no warm-up), and its peak GPU memory."""
    rig = Rig(world, case, scale, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    phases = [rig.round(r) for r in range(1, scale.rounds + 1)]
    measured = phases[1:] or phases
    result = {
        "case": case.title(scale),
        "key": case.key,
        **rig.sizes(),
        "phases": {k: sum(p[k] for p in measured) / len(measured) for k in measured[0]},
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device != "cpu" else None,
    }
    del rig
    release(device)
    return result


def round_phases(row: dict, mpi_seconds: float) -> dict[str, float]:
    """The round's ``timing/*`` (train, wait, allreduce, diagnostics, eval, round) without
    the prefix and suffix, and ``mpi``: the part of ``allreduce`` spent inside MPI."""
    phases = {
        k.removeprefix("timing/").removesuffix("_s"): float(v)
        for k, v in row.items()
        if k.startswith("timing/")
    }
    return {**phases, "mpi": mpi_seconds}


def rounds_worker(out: Path, keys: list[str], dry_run: bool) -> None:
    """Under mpiexec: every case in ``keys`` in turn; rank 0 rewrites
    ``OUTDIR/rounds-np<N>.json`` after each, so an abort keeps the finished ones."""
    from fedmpi.comm import World, abort_on_error, select_device, usable_cores
    from fedmpi.models import quiet_transformers

    world = World.from_comm()
    with abort_on_error(world):
        quiet_transformers()
        device = select_device(world, "cpu" if dry_run else "cuda")
        torch.set_num_threads(usable_cores(world))
        scale = DRY if dry_run else GPU
        done = []
        for case in (c for c in CASES if c.key in keys):
            mine = run_case(world, case, scale, device)
            every = world.comm.gather(mine, root=0)
            if world.is_root:
                mine["peak_bytes_by_rank"] = [r["peak_bytes"] for r in every]
                mine["card"] = card(device)
                done.append(mine)
                path = out / f"rounds-np{world.size}.json"
                path.write_text(json.dumps(done, indent=1))


def launch_rounds(args, np_: int, keys: list[str], timeout: float) -> tuple[list[dict], str]:
    """One ``mpiexec -n np_`` of the rounds worker: (its cases' results, what went wrong)."""
    path = args.out / f"rounds-np{np_}.json"
    path.unlink(missing_ok=True)
    command = [*mpiexec_prefix(args.mpiexec), "-n", str(np_), sys.executable, __file__]
    command += [str(args.out), "--worker", ",".join(keys), *(["--dry-run"] * args.dry_run)]
    log = args.out / f"rounds-np{np_}.log"
    problem = ""
    with open(log, "w") as handle:
        try:
            proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
            if proc.returncode:
                problem = f"mpiexec exited with {proc.returncode} (see {log.name})"
        except subprocess.TimeoutExpired:
            problem = f"stopped after {timeout:.0f} s, the time left (see {log.name})"
    return (json.loads(path.read_text()) if path.exists() else []), problem


def plan_cases(
    np_: int, scale: Scale, peaks: dict | None, device_bytes: int | None
) -> tuple[list, list]:
    """The case keys to run at np_ and why the others are not: after np=1 (``peaks``: its
    finished cases' peaks), only cases that finished there and whose np_ copies fit on
    the card with 10 % headroom and a CUDA context of about 0.6 GiB per rank."""
    keys, notes = [], []
    for case in CASES:
        if peaks is not None and case.key not in peaks:
            notes.append(f"{case.title(scale)} at np={np_}: it did not finish at np=1")
        elif peaks and peaks[case.key] and device_bytes:
            need = np_ * (1.1 * peaks[case.key] + 0.6 * GIB)
            if need < device_bytes:
                keys.append(case.key)
            else:
                notes.append(
                    f"{case.title(scale)} at np={np_}: about {need / GIB:.0f} GiB needed "
                    f"({np_} x its np=1 peak), the card has {device_bytes / GIB:.0f} GiB"
                )
        else:
            keys.append(case.key)
    return keys, notes


def run_rounds(args, scale: Scale, device: str, report: dict, env: dict, deadline: float):
    """The rounds at each rank count, in the time left; the report rewritten after each."""
    device_bytes = (
        torch.cuda.get_device_properties(device).total_memory if device != "cpu" else None
    )
    peaks, first_wall = None, None
    for np_ in scale.nps:
        keys, notes = plan_cases(np_, scale, peaks, device_bytes)
        report["not_run"] += notes
        left = deadline - time.monotonic()
        if first_wall is not None and np_ * first_wall > left:
            report["not_run"].append(
                f"np={np_}: about {np_ * first_wall:.0f} s expected, {left:.0f} s left"
            )
            continue
        start = time.monotonic()
        results, problem = launch_rounds(args, np_, keys, left)
        first_wall = first_wall or time.monotonic() - start
        print(f"gpu_check: rounds np={np_} took {time.monotonic() - start:.0f} s", flush=True)
        report["rounds"][np_] = results
        if problem:
            report["not_run"].append(f"np={np_}: {problem}; finished cases are reported")
        if peaks is None:
            peaks = {r["key"]: r["peak_bytes_by_rank"][0] for r in results}
        write_report(args, env, report)


# ---------------------------------------------------------------------- report


def table(header: list[str], rows: list[list]) -> str:
    align = ["---" if i < 2 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(name: str, results: list[dict]) -> str:
    """examples/s of both loops in both precisions, fedmpi / plain, and bf16 / fp32."""
    rate = {(r["precision"], r["loop"]): r["examples"] / r["s"] for r in results}
    rows = [
        [
            name,
            r["precision"],
            r["loop"],
            r["examples"],
            f"{r['s']:.3f}",
            f"{rate[r['precision'], r['loop']]:.1f}",
        ]
        for r in results
    ]
    precisions = sorted({p for p, _ in rate}, key=["fp32", "bf16"].index)
    for p in precisions:
        rows.append(
            [name, p, "fedmpi / plain", "", "", f"{rate[p, 'fedmpi'] / rate[p, 'plain']:.3f}x"]
        )
    if len(precisions) == 2:
        for loop in ("fedmpi", "plain"):
            rows.append(
                [
                    name,
                    "bf16 / fp32",
                    loop,
                    "",
                    "",
                    f"{rate['bf16', loop] / rate['fp32', loop]:.2f}x",
                ]
            )
    return table(["card", "precision", "loop", "examples", "s", "examples/s"], rows)


# The round's timing/* phases (fedmpi.round.PhaseClock), and "mpi", the share of
# "allreduce" inside MPI's Allreduce calls; evaluation is not run (no round is scored).
PHASES = ("train", "wait", "allreduce", "mpi", "diagnostics")
HEADERS = {"mpi": "of it in MPI"}


def phase_rows(rounds: dict[int, list[dict]], cells: Callable[[dict], list]) -> list[list]:
    """One row per (rank count, case): card, case, np, then ``cells(phases)``."""
    return [
        [r["card"], r["case"], np_, *cells(r["phases"])]
        for np_, results in sorted(rounds.items())
        for r in results
    ]


def seconds_table(rounds: dict[int, list[dict]]) -> str:
    """Rank 0's seconds per phase of a round."""
    rows = phase_rows(rounds, lambda p: [f"{p[k]:.3f}" for k in (*PHASES, "round")])
    headers = [f"{HEADERS.get(k, k)} s" for k in PHASES]
    return table(["card", "case", "np", *headers, "round s"], rows)


def share_table(rounds: dict[int, list[dict]]) -> str:
    """What is not local training, as a share of the round: all of it, then by phase."""

    def shares(p: dict) -> list[str]:
        return [f"{1 - p['train'] / p['round']:.1%}"] + [
            f"{p[k] / p['round']:.1%}" for k in PHASES[1:]
        ]

    return table(
        ["card", "case", "np", "not training", *(HEADERS.get(k, k) for k in PHASES[1:])],
        phase_rows(rounds, shares),
    )


def memory_table(rounds: dict[int, list[dict]]) -> str:
    """Peak GPU memory per rank, and LoRA's against full fine-tuning of the same model."""
    rows = []
    for np_, results in sorted(rounds.items()):
        by_key = {r["key"]: r for r in results}
        for r in results:
            peaks = r["peak_bytes_by_rank"]
            if peaks[0] is None:
                cells = ["n/a on CPU", ""]
            else:
                full = by_key.get(r["key"].replace("lora", "none"))
                ratio = max(peaks) / max(full["peak_bytes_by_rank"]) if full else None
                cells = [
                    ", ".join(f"{b / GIB:.2f}" for b in peaks),
                    f"{ratio:.3f}x" if ratio else "",
                ]
            rows.append(
                [r["card"], r["case"], np_, f"{r['trainable']:,}", f"{r['parameters']:,}"]
                + [f"{r['payload_bytes'] / 2**20:.2f}", *cells]
            )
    header = ["card", "case", "np", "trainable", "parameters", "payload MiB"]
    header += ["peak GiB per rank", "vs full"]
    return table(header, rows)


def sharing_table(rounds: dict[int, list[dict]]) -> str:
    """Training examples per second summed over the ranks that share the card."""
    rows, base = [], {}
    for np_, results in sorted(rounds.items()):
        for r in results:
            rate = np_ * r["examples_per_round"] / r["phases"]["train"]
            base.setdefault(r["key"], rate)
            rows.append(
                [
                    r["card"],
                    r["case"],
                    np_,
                    f"{r['phases']['train']:.3f}",
                    f"{rate:.1f}",
                    f"{rate / base[r['key']]:.2f}x",
                ]
            )
    return table(
        ["card", "case", "np", "train s (rank 0)", "examples/s, all ranks", "vs first np"], rows
    )


def environment(device: str, mpiexec: str) -> dict[str, str]:
    import peft
    import transformers
    from mpi4py import MPI

    env = {
        "card": card(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA (torch)": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "MPI (mpi4py's)": MPI.Get_library_version().splitlines()[0].strip(),
        "mpiexec": mpiexec,
        "CPU cores": str(os.cpu_count()),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env["GPU memory"] = f"{props.total_memory / GIB:.1f} GiB"
    return env


def write_report(args, env: dict, report: dict) -> None:
    """OUTDIR/gpu_check.md and .json, from whatever has been measured so far."""
    (args.out / "gpu_check.json").write_text(json.dumps({"environment": env, **report}, indent=1))
    parts = [f"# fedmpi GPU check: {env['card']}", ""]
    if args.dry_run:
        parts += [
            "**Dry run on the CPU with tiny shapes: these figures are not measurements.**",
            "",
        ]
    parts += ["## Environment", "", table(["", ""], [[k, v] for k, v in env.items()]), ""]
    scale = DRY if args.dry_run else GPU
    if "throughput" in report:
        parts += [
            "## 1. Local training: fedmpi against a plain loop, fp32 and bf16",
            "",
            f"Random {scale.names['bert']}, batch {scale.batch}, "
            f"length {scale.seq_len // 2}-{scale.seq_len}, fused AdamW; {scale.warmup} warm-up "
            f"+ {scale.blocks} x {scale.steps} timed steps per loop, alternated.",
            "",
            throughput_table(env["card"], report["throughput"]),
            "",
        ]
    rounds = {int(k): v for k, v in report.get("rounds", {}).items() if v}
    if rounds:
        parts += [
            "## 2. Round overhead (rank 0, mean of the rounds after the first)",
            "",
            f"One client per rank, all ranks on one card, in-place payload, FedAvg, "
            f"diagnostics full. Per round: BERT {scale.round_steps} steps of {scale.batch}, "
            f"Llama {scale.llama_round_steps} steps of {scale.llama_batch}, rows of length "
            f"{scale.seq_len // 2}-{scale.seq_len}.",
            "",
            seconds_table(rounds),
            "",
            "Share of the round that is not local training (train: from the round's start "
            "to the payload's last client, with the diagnostics' pass over each client's "
            "update; allreduce: the payload's scaling, host staging, the Allreduce, the "
            "diagnostics' pass over the average and the server step, of which 'of it in "
            "MPI' is inside MPI's Allreduce calls; diagnostics: the hook after the server "
            "step, its global pass and its small Allreduce):",
            "",
            share_table(rounds),
            "",
            "## 3. GPU memory per rank: full fine-tuning against LoRA",
            "",
            "torch.cuda.max_memory_allocated over the rounds (after the model was built).",
            "",
            memory_table(rounds),
            "",
            "## 4. Ranks sharing the card",
            "",
            sharing_table(rounds),
            "",
        ]
    if report.get("not_run"):
        parts += ["## Not run", "", *[f"- {line}" for line in report["not_run"]], ""]
    (args.out / "gpu_check.md").write_text("\n".join(parts))


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for gpu_check.md, .json and logs")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--mpiexec", default=DEFAULT_MPIEXEC)
    parser.add_argument("--budget-s", type=float, default=330, help="seconds this may take")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # under mpiexec: case keys
    args = parser.parse_args()
    if args.worker is not None:
        return rounds_worker(args.out, args.worker.split(","), args.dry_run)
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    from fedmpi.models import quiet_transformers

    quiet_transformers()
    device = "cpu" if args.dry_run else "cuda:0"
    if device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run to check the script on CPU)")
    env = environment(device, args.mpiexec)
    scale = DRY if args.dry_run else GPU
    report: dict = {"rounds": {}, "not_run": []}
    sections = {
        "throughput": lambda: report.update(throughput=throughput(scale, device)),
        "rounds": lambda: run_rounds(args, scale, device, report, env, deadline),
    }
    failed = [name for name, section in sections.items() if not run_section(name, section, report)]
    write_report(args, env, report)
    print((args.out / "gpu_check.md").read_text())
    if failed:
        raise SystemExit(f"gpu_check: failed: {', '.join(failed)} (see the log)")


def run_section(name: str, section: Callable[[], object], report: dict) -> bool:
    """Run one section; a failure is logged and reported, and the next section still runs
    (there is one try on the GPU machine)."""
    start = time.monotonic()
    print(f"gpu_check: {name} ...", flush=True)
    try:
        section()
    except Exception:
        traceback.print_exc()
        report["not_run"].append(f"{name}: failed, see gpu_check.log")
        return False
    print(f"gpu_check: {name} done in {time.monotonic() - start:.0f} s", flush=True)
    return True


if __name__ == "__main__":
    main()
