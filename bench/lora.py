"""Full fine-tuning vs LoRA vs LoRA with frozen A: what travels, what it costs, what it learns.

(Named lora.py, not peft.py: a bench/peft.py would shadow the ``peft`` package for any
script run from bench/.)

    python bench/lora.py [--part cost|accuracy|all] [--nps 2 4] [--out bench-lora]

Every figure comes from the real job (``mpiexec -n NP python -m fedmpi``), read back from
its log and results.h5, so it is what a user gets:

* **cost** (``--part cost``), for ``minilm`` (22.7M, fp32 checkpoint) and a random
  Llama-architecture decoder of ~185M parameters saved in bf16 here (hidden 1024, 12
  layers, MiniLM's tokenizer): trainable and total parameters and the Allreduce payload
  (the start-up line, ``comm/payload_bytes``), rank 0's median Allreduce seconds, the
  local step time (``timing/train_s`` over the steps a rank took), and the peak of the
  summed PSS of all ranks (``/proc/PID/smaps_rollup``, sampled every 0.2 s: pages a rank
  shares with others, e.g. a memory-mapped bf16 base, count once in the sum), at each
  ``--nps``. One client per rank, 2 rounds, no evaluation until the last.
* **accuracy** (``--part accuracy``): ``minilm`` on rotten_tomatoes, 4 clients on 2 ranks,
  4 rounds, 1,000 training and 500 test examples, seeds 1 and 2: full fine-tuning at lr
  5e-5 (the default), LoRA and LoRA with frozen A at lr 5e-4 and 2e-3 (adapters start at
  B = 0 and want larger steps).

A job already finished with the same flags (its ``bench.json``) is read back, not rerun.

Prints markdown tables and writes them with the raw numbers (JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from runjob import run_with_pss

from fedmpi.results import read_results

MPIEXEC = str(Path(sys.executable).with_name("mpiexec"))
MODES = {
    "full": [],
    "lora": ["--peft", "lora"],
    "lora-freeze-a": ["--peft", "lora", "--lora-freeze-a"],
}
STARTUP = re.compile(r"([\d,]+) trainable of ([\d,]+) parameters")
LORA_LRS = ["5e-4", "2e-3"]  # adapters start at B = 0: they want larger steps


def make_llama(directory: Path) -> Path:
    """A random Llama-architecture classifier (~185M parameters), saved in bf16 as hub LLMs
    are, with MiniLM's tokenizer (its [PAD] is the pad token)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from fedmpi.models import resolve_model

    if (directory / "config.json").exists():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    # Saved without its head, like a pretrained decoder: fedmpi adds a new one.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
    model.save_pretrained(directory, state_dict=state)
    tokenizer.save_pretrained(directory)
    return directory


def run_job(np_: int, out: Path, flags: list[str]) -> dict:
    """One fedmpi job; what it printed and recorded, and its peak memory. A job that
    finished before with the same flags is read back, not rerun (the bench resumes)."""
    done = out / "bench.json"
    if done.exists() and json.loads(done.read_text())["flags"] == flags:
        return json.loads(done.read_text())["job"]
    command = [MPIEXEC, "-n", str(np_), sys.executable, "-m", "fedmpi", "--output", str(out)]
    start = time.perf_counter()
    log, sampler = run_with_pss([*command, "--overwrite", *flags])
    trainable, total = (int(x.replace(",", "")) for x in STARTUP.search(log).groups())
    results = read_results(out / "results.h5")
    job = {
        "trainable": trainable,
        "total": total,
        "payload_bytes": int(np.asarray(results["comm/payload_bytes"])[-1]),
        "allreduce_s": float(np.median(results["timing/allreduce_s"])),
        "train_s": np.asarray(results["timing/train_s"], dtype=float).tolist(),
        "final_accuracy": float(np.asarray(results["metrics/test_accuracy"])[-1]),
        "peak_pss_total_mb": sampler.peak_total_mb,
        "peak_pss_rank_mb": sampler.peak_rank_mb,
        "wall_s": time.perf_counter() - start,
    }
    done.write_text(json.dumps({"flags": flags, "job": job}))
    return job


def available_mb() -> float:
    """MemAvailable of this machine, in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def fits(job: dict | None, np_: int) -> bool:
    """Whether ``np_`` ranks of a job whose 2-rank run peaked at ``job`` fit in memory."""
    return job is None or job["peak_pss_rank_mb"] * np_ < 0.8 * available_mb()


def cost(out: Path, nps: list[int]) -> list[dict]:
    """Bytes, Allreduce, step time and memory of each mode, per model and rank count."""
    llama = make_llama(out / "llama-185m-bf16")
    models = {
        "minilm": ["--model", "minilm", "--batch-size", "16", "--train-samples", "64"],
        "llama-185m-bf16": ["--model", str(llama), "--batch-size", "4", "--train-samples", "16"],
    }
    rows, first = [], {}
    for model, model_flags in models.items():
        for np_ in nps:
            for mode, mode_flags in MODES.items():
                if not fits(first.get((model, mode)), np_):
                    print(f"{model} {mode} at np={np_}: skipped, would not fit in memory")
                    continue
                batch = int(model_flags[model_flags.index("--batch-size") + 1])
                samples = int(model_flags[model_flags.index("--train-samples") + 1])
                steps = -(-samples // np_ // batch)  # one client per rank, one epoch
                job = run_job(
                    np_,
                    out / f"cost-{model}-{mode}-np{np_}",
                    [
                        *model_flags,
                        *mode_flags,
                        "--clients", str(np_), "--rounds", "2", "--max-seq-len", "32",
                        "--test-samples", "32", "--eval-every", "2", "--diagnostics", "off",
                        "--threads", "1",
                    ],
                )  # fmt: skip
                # The last round's local training: the first pays one-off warm-up.
                job.update(model=model, mode=mode, np=np_, step_s=job["train_s"][-1] / steps)
                first.setdefault((model, mode), job)
                rows.append(job)
                print(_cost_row(job), flush=True)
    return rows


def accuracy(out: Path) -> list[dict]:
    """minilm on rotten_tomatoes after the same rounds, each mode at its learning rates."""
    rows = []
    for mode, mode_flags in MODES.items():
        for lr in ["5e-5"] if mode == "full" else LORA_LRS:
            for seed in (1, 2):
                rows.append(_accuracy_run(out, mode, mode_flags, lr, seed))
    return rows


def _accuracy_run(out: Path, mode: str, mode_flags: list[str], lr: str, seed: int) -> dict:
    job = run_job(
        2,
        out / f"accuracy-{mode}-lr{lr}-s{seed}",
        [
            *mode_flags,
            "--lr", lr, "--seed", str(seed), "--clients", "4", "--rounds", "4",
            "--train-samples", "1000", "--test-samples", "500", "--eval-every", "4",
            "--diagnostics", "off",
        ],
    )  # fmt: skip
    job.update(mode=mode, lr=lr, seed=seed)
    print(f"{mode} lr {lr} seed {seed}: accuracy {job['final_accuracy']:.3f}", flush=True)
    return job


def _cost_row(r: dict) -> str:
    return (
        f"| {r['model']} | {r['mode']} | {r['np']} | {r['trainable']:,} of {r['total']:,} "
        f"({100 * r['trainable'] / r['total']:.2f} %) | {r['payload_bytes'] / 2**20:.2f} "
        f"| {1000 * r['allreduce_s']:.1f} | {r['step_s']:.2f} | {r['peak_pss_total_mb']:,.0f} "
        f"| {r['peak_pss_rank_mb']:,.0f} |"
    )


def tables(cost_rows: list[dict], accuracy_rows: list[dict]) -> str:
    lines = []
    if cost_rows:
        lines += [
            "| model | mode | np | trainable parameters | payload MiB | Allreduce ms | "
            "local step s | peak PSS, all ranks MB | peak PSS, one rank MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            *map(_cost_row, cost_rows),
            "",
        ]
    if accuracy_rows:
        lines += ["| mode | lr | accuracy (seeds 1, 2) | mean |", "|---|---|---|---:|"]
        settings = dict.fromkeys((r["mode"], r["lr"]) for r in accuracy_rows)
        for mode, lr in settings:
            accs = [
                r["final_accuracy"] for r in accuracy_rows if (r["mode"], r["lr"]) == (mode, lr)
            ]
            lines.append(
                f"| {mode} | {lr} | {', '.join(f'{a:.3f}' for a in accs)} | {np.mean(accs):.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cost", "accuracy", "all"), default="all")
    parser.add_argument("--nps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", type=Path, default=Path("bench-lora"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cost_rows = cost(args.out, args.nps) if args.part in ("cost", "all") else []
    accuracy_rows = accuracy(args.out) if args.part in ("accuracy", "all") else []
    text = tables(cost_rows, accuracy_rows)
    print(text)
    (args.out / "lora.md").write_text(text + "\n")
    (args.out / "lora.json").write_text(json.dumps(cost_rows + accuracy_rows, indent=1))


if __name__ == "__main__":
    main()
