"""Examples/s of fedmpi's local training against a minimal plain PyTorch loop.

    python bench/throughput.py [--steps 10] [--blocks 3] [--warmup 3] [--threads 1]

One process, no MPI. Both loops train the default model (offline MiniLM, two labels, the
same initial weights) on the same Rotten Tomatoes rows (from fedmpi's token cache when it
exists, else a few hundred texts tokenized with fedmpi.data), batch 16, max length 64,
each batch padded to its longest row, fused AdamW (lr 5e-5), ``--threads`` torch threads:

* fedmpi: ``fedmpi.client.train_client`` on ``fedmpi.device_rows.DeviceRows``, with the
  parameters flattened by ``fedmpi.flat.FlatParameters`` and the optimizer from
  ``fedmpi.client.make_optimizer``, exactly as a round runs them;
* plain: ``model(**batch).loss.backward(); opt.step(); opt.zero_grad()`` over batches
  built beforehand (untimed) from the same rows in the same order.

After ``--warmup`` steps of each, ``--blocks`` blocks of ``--steps`` steps alternate
between the two (who goes first alternates too); prints examples/s and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch

from fedmpi import data
from fedmpi.client import make_optimizer, train_client
from fedmpi.config import Config
from fedmpi.device_rows import DeviceRows
from fedmpi.flat import FlatParameters
from fedmpi.models import load_model, load_tokenizer, quiet_transformers


def load_rows(cfg: Config, n: int) -> data.TokenizedRows:
    """n training rows: from the token cache if the job has built it, else tokenized here."""
    tokenizer = load_tokenizer(cfg.model)
    path = data.cache_path(cfg, tokenizer)
    if path.exists():
        print(f"rows: {n} from the token cache {path}")
        rows = np.random.default_rng(0).permutation(data.read_info(path).n_train)[:n]
        return data.read_rows(path, "train", rows)
    print(f"rows: the first {n} training texts, tokenized")
    splits = data.load_text_splits(cfg)
    ids, lengths = data.tokenize(splits.train_texts[:n], tokenizer, cfg.max_seq_len, print)
    return data.TokenizedRows(ids, lengths, np.asarray(splits.train_labels[:n], dtype=np.int64))


def plain_batches(rows: DeviceRows, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The batches train_client draws for this seed, padded to their longest row."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    batches = []
    for index in order.split(batch_size):
        index = index.to(rows.labels.device)
        width = int(rows.lengths[index].max())
        mask = torch.arange(width, device=index.device)[None, :] < rows.lengths[index][:, None]
        batches.append(
            {
                "input_ids": rows.input_ids[index, :width].long(),
                "attention_mask": mask.long(),
                "labels": rows.labels[index],
            }
        )
    return batches


def plain_loop(model, optimizer, batches, seed: int, compute: str = "fp32") -> None:
    """The minimal loop: forward (under bf16 autocast if asked), backward, step."""
    if compute not in ("fp32", "bf16"):
        raise ValueError(f"the plain loop runs fp32 or bf16, not {compute}")
    device_type = batches[0]["labels"].device.type
    model.train()
    torch.manual_seed(seed)
    for batch in batches:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=compute == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def split_rows(rows: data.TokenizedRows, sizes: list[int], device: str) -> list[DeviceRows]:
    """Consecutive blocks of ``sizes`` rows, each on ``device``."""
    bounds = np.cumsum([0, *sizes])
    return [
        DeviceRows.from_rows(
            data.TokenizedRows(*(a[lo:hi] for a in dataclasses.astuple(rows))), device
        )
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loops(model: torch.nn.Module, blocks: list[DeviceRows], cfg: Config) -> dict[str, float]:
    """Seconds of fedmpi's loop and of the plain loop over ``blocks[1:]`` (``blocks[0]``
    warms both up), on copies of ``model`` with the same initial weights, computing in
    ``cfg.precision``. Who goes first alternates from block to block, so neither loop
    always inherits the other's warm caches or pays for its clean-up."""
    plain_model = copy.deepcopy(model)
    fed_model = copy.deepcopy(model)
    flat = FlatParameters(fed_model)
    fed_opt = make_optimizer(cfg, flat.params)
    plain_params = [p for p in plain_model.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(
        plain_params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    device = blocks[0].labels.device
    seconds = {"fedmpi": 0.0, "plain": 0.0}
    for i, rows in enumerate(blocks):
        seed = 1000 + i
        batches = plain_batches(rows, cfg.batch_size, seed)

        def run_fedmpi(rows=rows, seed=seed) -> None:
            train_client(fed_model, rows, cfg, seed, fed_opt)

        def run_plain(batches=batches, seed=seed) -> None:
            plain_loop(plain_model, plain_opt, batches, seed, cfg.precision)

        runs = [("fedmpi", run_fedmpi), ("plain", run_plain)]
        for name, fn in runs if i % 2 else runs[::-1]:
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i > 0:
                seconds[name] += time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks of each loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    cfg = dataclasses.replace(Config(), group_by_length=False)  # plain random batches
    bs = cfg.batch_size
    sizes = [args.warmup * bs] + [args.steps * bs] * args.blocks
    blocks = split_rows(load_rows(cfg, sum(sizes)), sizes, "cpu")

    torch.manual_seed(cfg.seed)
    model, _ = load_model(cfg.model, ["fresh", "rotten"])
    seconds = time_loops(model, blocks, cfg)
    examples = args.steps * bs * args.blocks
    print(
        f"MiniLM, batch {bs}, max length {cfg.max_seq_len}, {args.threads} thread(s), "
        f"{args.warmup} warm-up + {args.blocks} x {args.steps} timed steps each, alternated\n"
    )
    print("| loop | steps | examples | s | examples/s |\n|---|---:|---:|---:|---:|")
    for name, s in seconds.items():
        print(
            f"| {name} | {args.steps * args.blocks} | {examples} | {s:.2f} | {examples / s:.2f} |"
        )
    print(f"| fedmpi / plain | | | | {seconds['plain'] / seconds['fedmpi']:.3f}x |")


if __name__ == "__main__":
    main()
