"""malloc settings and allocators against the speed and peak memory of local training.

    python bench/malloc.py [--steps 12] [--repeats 2]

Each setting runs in a fresh process (glibc reads ``MALLOC_*`` at start): MiniLM, fused
AdamW, one thread, ``--steps`` steps on batches of 16 random token ids whose length
cycles through 40-63 (as unsorted batches of the default job do). Prints each setting's
median step time (the first two steps left out) and VmHWM, the settings interleaved
``--repeats`` times so that a busy machine hits them alike.

Why: glibc raises its mmap threshold each time a large block is freed, so activations
and optimizer state come from a heap that keeps what they free; fixing the threshold
returns them at every free instead, and each allocation then costs fresh page faults.
jemalloc and tcmalloc (rows only where installed) return freed memory without that cost,
which is why ``python -m fedmpi`` preloads one when it can (``fedmpi.allocator``).
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


def allocator_settings() -> dict[str, dict[str, str]]:
    """jemalloc and tcmalloc, preloaded, where the system has them (what
    ``FEDMPI_MALLOC=auto`` picks from, jemalloc first)."""
    return {
        f"{library.name} (LD_PRELOAD, no glibc setting)": {"LD_PRELOAD": str(library)}
        for library in installed_libraries(dict(os.environ))
    }


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
    times = []
    for step in range(steps):
        ids = torch.randint(1000, 20000, (16, 40 + (step * 7) % 24))
        labels = torch.randint(0, 2, (16,))
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(line for line in status if line.startswith("VmHWM"))
    print(statistics.median(times[2:]), int(hwm.split()[1]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps)
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"
    }
    base["HF_HUB_OFFLINE"] = "1"
    settings = {**SETTINGS, **allocator_settings()}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, env in settings.items():
            command = [sys.executable, __file__, "--worker", "--steps", str(args.steps)]
            out = subprocess.run(
                command, env={**base, **env}, check=True, capture_output=True, text=True
            ).stdout.split()
            results[name].append((float(out[-2]), float(out[-1])))
    print(f"MiniLM, batch 16 x 40-63 tokens, fused AdamW, 1 thread, {args.steps} steps\n")
    print("| allocator setting | s/step (median of runs) | VmHWM MiB |\n|---|---:|---:|")
    for name, runs in results.items():
        step = statistics.median(s for s, _ in runs)
        hwm = statistics.median(h for _, h in runs)
        print(f"| {name} | {step:.3f} | {hwm:.0f} |")


if __name__ == "__main__":
    main()
