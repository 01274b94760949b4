"""malloc settings and allocators against the speed and peak memory of local training.

    python bench/malloc.py [--steps 12] [--repeats 2] [--only NAME ...]

Each setting runs in a fresh process (glibc reads ``MALLOC_*`` at start): MiniLM, fused
AdamW, one thread, ``--steps`` steps on batches of 16 random token ids whose length
cycles through 40-63 (as unsorted batches of the default job do). Prints each setting's
median step time (the first two steps left out), its CPU time (user + system: page
faults included, waits for a busy machine's cores not) and VmHWM, the settings
interleaved ``--repeats`` times so that a busy machine hits them alike; ``--only``
picks settings by name.

Why: glibc raises its mmap threshold each time a large block is freed, so activations
and optimizer state come from a heap that keeps what they free; fixing the threshold
returns them at every free instead, and each allocation then costs fresh page faults.
jemalloc, mimalloc and tcmalloc (rows only where installed; mimalloc also with other
options) return freed memory without that cost, which is why ``python -m fedmpi``
preloads one when it can (``fedmpi.allocator``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedmpi.allocator import installed_libraries

SETTINGS = {
    "glibc default": {},
    "MALLOC_MMAP_THRESHOLD_=128 KiB (fixed)": {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)},
    "MALLOC_MMAP_THRESHOLD_=1 MiB (fixed)": {
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    },
    "MALLOC_TOP_PAD_=64 MiB": {"MALLOC_TOP_PAD_": str(64 << 20)},
}


# mimalloc's options tried (its defaults: decommit what stays free for 1 s, in v3.4).
MIMALLOC_OPTIONS = {
    "MIMALLOC_PURGE_DELAY=10000 (10 s)": {"MIMALLOC_PURGE_DELAY": "10000"},
    "MIMALLOC_PURGE_DELAY=0 (at once)": {"MIMALLOC_PURGE_DELAY": "0"},
    "MIMALLOC_PURGE_DECOMMITS=0 (MADV_FREE)": {"MIMALLOC_PURGE_DECOMMITS": "0"},
    "MIMALLOC_ARENA_EAGER_COMMIT=0": {"MIMALLOC_ARENA_EAGER_COMMIT": "0"},
}


def allocator_settings() -> dict[str, dict[str, str]]:
    """jemalloc, mimalloc and tcmalloc, preloaded, where installed (what
    ``FEDMPI_MALLOC=auto`` picks from), as fedmpi runs them (their defaults); mimalloc
    also with the options above."""
    settings = {}
    for library in installed_libraries(dict(os.environ)):
        preload = {"LD_PRELOAD": str(library)}
        settings[f"{library.name} (its defaults)"] = preload
        if "mimalloc" in library.name:
            for name, options in MIMALLOC_OPTIONS.items():
                settings[f"{library.name}, {name}"] = {**preload, **options}
    return settings


def worker(steps: int) -> None:
    import torch

    from fedmpi.models import load_model, quiet_transformers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    quiet_transformers()
    model, _ = load_model("minilm", ["negative", "positive"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    model.train()
    times, cpu = [], []
    for step in range(steps):
        ids = torch.randint(1000, 20000, (16, 40 + (step * 7) % 24))
        labels = torch.randint(0, 2, (16,))
        start, start_cpu = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(line for line in status if line.startswith("VmHWM"))
    print(statistics.median(times[2:]), statistics.median(cpu[2:]), int(hwm.split()[1]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--only", action="append", help="run only the settings whose name has this (repeatable)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps)
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "MIMALLOC_")) and k != "LD_PRELOAD"
    }
    base["HF_HUB_OFFLINE"] = "1"
    settings = {**SETTINGS, **allocator_settings()}
    if args.only:
        settings = {k: v for k, v in settings.items() if any(o in k for o in args.only)}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, env in settings.items():
            command = [sys.executable, __file__, "--worker", "--steps", str(args.steps)]
            out = subprocess.run(
                command, env={**base, **env}, check=True, capture_output=True, text=True
            ).stdout.split()
            results[name].append(tuple(float(x) for x in out[-3:]))
    print(f"MiniLM, batch 16 x 40-63 tokens, fused AdamW, 1 thread, {args.steps} steps\n")
    print(
        "| allocator setting | s/step (median of runs) | CPU s/step | VmHWM MiB |\n"
        "|---|---:|---:|---:|"
    )
    for name, runs in results.items():
        step, cpu, hwm = (statistics.median(column) for column in zip(*runs, strict=True))
        print(f"| {name} | {step:.3f} | {cpu:.3f} | {hwm:.0f} |")


if __name__ == "__main__":
    main()
