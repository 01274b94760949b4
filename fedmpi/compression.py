"""Compressed client updates: each client's update as it would be uploaded (``--compress``),
error feedback (``--error-feedback``), and the bytes the upload would take on a wire.

The round's ``UpdateCompression`` hook runs after a client trained: its update
``u = params - start`` (plus, with error feedback, what the client's earlier uploads
dropped) is compressed and decompressed, and the client's model becomes
``start + decompress(compress(u))``: the payload then averages what the clients would
have sent. The Allreduce itself stays fp32 (the simulation of the upload, not the wire).

Formats (``docs/compression.md`` has the numbers):

* ``bf16``, ``fp16``: every value rounded to nearest (fp16 saturates at +-65504 instead of
  overflowing); 2 bytes a value.
* ``int8``, ``int4``: blocks of ``BLOCK`` = 256 consecutive values of the flat buffer share
  one fp32 scale, their largest magnitude ``s``; each value ``x`` becomes an integer
  ``q`` in [-L, L] (L = 127, 7) by *stochastic* rounding of ``x L / s``: up with
  probability equal to the fraction, so ``E[q s / L] = x`` (unbiased, QSGD-style). 1 byte
  or half a byte a value, plus 4 bytes a block. The block size bounds the error: a block
  errs by at most one step ``s / L`` per value, and at 256 values an int4 block's expected
  squared error stays below 0.75 of its squared norm (a contraction, which error feedback
  needs; it would not be at about 400 values and more).
* ``topk:F``: the ``k = max(1, round(F n))`` values of largest magnitude (ties to the
  lowest position) and their positions; 4 bytes a value, plus the positions as 32-bit
  indices (64-bit past 2^32 values) or, where smaller, a bitmap of n bits.
* ``randk:F``: k values at positions drawn uniformly without replacement, multiplied by
  ``n / k`` so that the upload is unbiased. The positions follow from (seed, client,
  round), which the server knows, so only the values travel: 4 bytes each. With error
  feedback the values go unscaled: the scaled estimate is not a contraction (its
  expected error is ``(n / k - 1)`` times the update's squared norm), and feeding its
  error back diverges; unscaled, the dropped coordinates wait in the residual.

**Error feedback** (Seide et al. 2014; Karimireddy et al. 2019): each client keeps the
residual ``r = u - decompress(compress(u))`` of its last upload, on the rank hosting it
(one fp32 copy of the trainable parameters per client, allocated when the client first
trains), and adds it to its next update. What a client sent over its rounds plus its
residual is then the sum of its true updates. The residuals are checkpointed per client
like ``--keep-local-opt``'s optimizer states (``fedmpi.checkpointer``).

**Random choices** (stochastic rounding, random-k positions) come from a generator seeded
by (seed, client, round) alone, so a run does not depend on ``-np``, and a resumed run
repeats them. They are drawn on the parameters' device: a CUDA run draws other numbers
than a CPU run of the same seed.

**Memory.** The element-wise formats (bf16, fp16, int8, int4) work through the flat
buffer in chunks of ``CHUNK`` values with a few chunk-sized scratch buffers: no
model-sized temporary. Top-k and random-k select their k positions in one streaming pass
that holds at most ``2k`` + one chunk candidates (key and position, 12 to 16 bytes each):
O(k), model-sized only for fractions near 1.

**Accounting.** ``comm/client_upload_bytes`` (per round and client, NaN for clients that
did not upload) is what the format would put on a wire: values, scales and indices. Under
DP the clip multiplies the decoded update by one factor (a 4-byte float, not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedmpi import results_keys as rk
from fedmpi.flat import flat_zeros
from fedmpi.hooks import RoundContext, RoundHook

if TYPE_CHECKING:
    from fedmpi.config import Config

BLOCK = 256  # values per fp32 scale of int8 and int4
CHUNK = 1 << 20  # values per pass over the flat buffer (a multiple of BLOCK)
FP16_MAX = 65504.0
LEVELS = {"int8": 127, "int4": 7}
ELEMENTWISE = ("bf16", "fp16", "int8", "int4")
SPARSE = ("topk", "randk")
FORMATS = ("none", *ELEMENTWISE, *SPARSE)
_STREAM_TAG = 0xC0  # keeps the compression stream apart from the client's training stream
_USAGE = "expected none, bf16, fp16, int8, int4, topk:F or randk:F (F a fraction in (0, 1])"


@dataclass(frozen=True)
class CompressionSpec:
    """A ``--compress`` value: the format, and the kept fraction of top-k and random-k."""

    kind: str
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> CompressionSpec:
        """Parse ``--compress``; ValueError with one line saying what is expected."""
        kind, colon, arg = str(text).strip().partition(":")
        if kind in ("none", *ELEMENTWISE) and not colon:
            return cls(kind)
        if kind in SPARSE and not colon:
            raise ValueError(f"{kind} needs its fraction: {kind}:F, F in (0, 1] (e.g. {kind}:0.01)")
        if kind in SPARSE:
            try:
                fraction = float(arg)
            except ValueError:
                fraction = math.nan
            if not 0 < fraction <= 1:  # NaN fails too
                raise ValueError(f"{kind}:F needs a fraction F in (0, 1], got {arg!r}")
            return cls(kind, fraction)
        raise ValueError(f"{text!r} is not an update format: {_USAGE}")

    def __str__(self) -> str:
        return self.kind if self.fraction is None else f"{self.kind}:{self.fraction:g}"

    def kept(self, numel: int) -> int:
        """Values top-k and random-k keep of ``numel`` (all, for the other formats)."""
        if self.fraction is None:
            return numel
        return min(numel, max(1, round(self.fraction * numel)))

    def upload_bytes(self, numel: int) -> int:
        """Bytes one client's upload of ``numel`` values takes: values, scales, indices."""
        blocks = -(-numel // BLOCK)
        if self.kind == "none":
            return 4 * numel
        if self.kind in ("bf16", "fp16"):
            return 2 * numel
        if self.kind == "int8":
            return numel + 4 * blocks
        if self.kind == "int4":
            return -(-numel // 2) + 4 * blocks
        k = self.kept(numel)
        if self.kind == "randk":
            return 4 * k  # the positions follow from (seed, client, round)
        index_list = k * (4 if numel <= 2**32 else 8)
        return 4 * k + min(index_list, -(-numel // 8))


def stream_seed(seed: int, client: int, round_: int) -> int:
    """The seed of ``client``'s compression draws in ``round_``: (seed, client, round) only."""
    state = np.random.SeedSequence([seed, client, round_, _STREAM_TAG]).generate_state(2)
    return int(state[0]) << 31 | int(state[1]) >> 1  # 63 bits


class Compressor:
    """One format's round trip on a flat update, in place, chunk by chunk."""

    def __init__(self, spec: CompressionSpec, numel: int, error_feedback: bool = False) -> None:
        if spec.kind not in FORMATS:
            raise ValueError(f"unknown update format {spec.kind!r}")
        self.spec, self.numel, self.error_feedback = spec, numel, error_feedback
        self.k = spec.kept(numel)
        # Random-k is rescaled to be unbiased, except under error feedback (see above).
        self.scale = numel / self.k if spec.kind == "randk" and not error_feedback else 1.0
        self._scratch: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def upload_bytes(self) -> int:
        return self.spec.upload_bytes(self.numel)

    def apply(
        self,
        params: torch.Tensor,
        start: torch.Tensor,
        residual: torch.Tensor | None,
        seed: int,
    ) -> None:
        """``params <- start + decompress(compress(u))`` with ``u = params - start`` (plus
        ``residual``, which then becomes what this upload dropped: ``u`` minus what was
        sent). ``seed`` (``stream_seed``) determines every random choice."""
        if params.numel() != self.numel:
            raise ValueError(f"expected {self.numel} values, got {params.numel()}")
        if self.spec.kind == "none":
            if residual is not None:  # nothing dropped: the residual goes out whole
                params.add_(residual)
                residual.zero_()
            return
        generator = self._generator(params.device)
        generator.manual_seed(seed)
        if self.spec.kind in SPARSE:
            self._sparse(params, start, residual, generator)
        else:
            self._elementwise(params, start, residual, generator)

    def roundtrip(self, update: torch.Tensor, seed: int) -> torch.Tensor:
        """``decompress(compress(update))`` as a new tensor (for tests and benchmarks)."""
        out = update.detach().clone()
        self.apply(out, torch.zeros_like(out), None, seed)
        return out

    # ------------------------------------------------------------------ element-wise

    def _elementwise(
        self,
        params: torch.Tensor,
        start: torch.Tensor,
        residual: torch.Tensor | None,
        generator: torch.Generator,
    ) -> None:
        update = self._buffer("update", params.device)
        for lo in range(0, self.numel, CHUNK):
            hi = min(self.numel, lo + CHUNK)
            u = update[: hi - lo]
            torch.sub(params[lo:hi], start[lo:hi], out=u)
            if residual is not None:
                u.add_(residual[lo:hi])
            sent = self._round_trip_chunk(u, generator)
            if residual is not None:
                torch.sub(u, sent, out=residual[lo:hi])
            torch.add(start[lo:hi], sent, out=params[lo:hi])

    def _round_trip_chunk(self, u: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The decoded upload of one chunk, in a scratch buffer (``u`` is left as it is)."""
        kind, n = self.spec.kind, u.numel()
        out = self._buffer("sent", u.device)[:n]
        if kind == "bf16":
            return out.copy_(u.to(torch.bfloat16))
        if kind == "fp16":
            torch.clamp(u, -FP16_MAX, FP16_MAX, out=out)
            return out.copy_(out.to(torch.float16))
        levels = LEVELS[kind]
        padded = -(-n // BLOCK) * BLOCK  # the last block of the buffer is padded with zeros
        work = self._buffer("work", u.device)[:padded]
        work[:n].copy_(u)
        work[n:].zero_()
        blocks = work.view(-1, BLOCK)
        low, high = torch.aminmax(blocks, dim=1, keepdim=True)
        scale = torch.maximum(high, low.neg_())  # each block's largest magnitude
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        blocks.div_(safe).mul_(levels)  # x L / s, in [-L, L]
        whole = self._buffer("whole", u.device)[:padded].view(-1, BLOCK)
        torch.floor(blocks, out=whole)
        blocks.sub_(whole)  # the fraction in [0, 1)
        draws = self._buffer("draws", u.device)[:padded].view(-1, BLOCK)
        draws.uniform_(generator=generator)
        whole.add_(draws < blocks)  # up with probability equal to the fraction: unbiased
        whole.mul_(safe / levels)
        return out.copy_(whole.view(-1)[:n])

    # ------------------------------------------------------------------ sparse

    def _sparse(
        self,
        params: torch.Tensor,
        start: torch.Tensor,
        residual: torch.Tensor | None,
        generator: torch.Generator,
    ) -> None:
        """Top-k or random-k: one pass selects the k positions (with error feedback it
        also leaves ``u`` in ``residual``), then the model becomes the start plus the
        kept values."""
        top = self.spec.kind == "topk"
        device = params.device
        update = self._buffer("update", device)
        keys = self._buffer("keys", device) if top else self._buffer("keys64", device)
        largest = Largest(self.k)
        for lo in range(0, self.numel, CHUNK):
            hi = min(self.numel, lo + CHUNK)
            if residual is not None or top:
                u = update[: hi - lo]
                torch.sub(params[lo:hi], start[lo:hi], out=u)
                if residual is not None:
                    u = residual[lo:hi].add_(u)  # r + (params - start): the whole update
            if top:
                chunk_keys = torch.abs(u, out=keys[: hi - lo])
            else:  # uniform float64 keys: the k largest are a uniform k-subset
                chunk_keys = keys[: hi - lo].uniform_(generator=generator)
            largest.feed(chunk_keys, lo)
        kept = largest.positions()
        values = residual[kept] if residual is not None else params[kept] - start[kept]
        sent = values * self.scale if self.scale != 1.0 else values
        params.copy_(start)
        params[kept] = start[kept] + sent
        if residual is not None:
            residual[kept] = values - sent  # 0: the kept values went out whole

    # ------------------------------------------------------------------ buffers

    def _buffer(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._scratch:
            dtype = torch.float64 if name == "keys64" else torch.float32
            size = min(CHUNK, _round_up(self.numel))
            self._scratch[key] = torch.empty(size, dtype=dtype, device=device)
        return self._scratch[key]

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def _round_up(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


def kth_largest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of ``keys`` (1 <= k <= its size), as a 0-d tensor of its dtype: a
    linear-time selection (numpy's introselect on the CPU, about 2x torch's kthvalue)."""
    rank = keys.numel() - k  # its place in increasing order
    if keys.device.type == "cpu":
        value = np.partition(keys.numpy(), rank)[rank]
        return torch.tensor(value, dtype=keys.dtype)
    return torch.kthvalue(keys, rank + 1).values


class Largest:
    """The k largest keys fed so far and their positions, ties going to the lowest
    position. Fed chunk by chunk in increasing positions, it holds at most 2k + one chunk
    candidates: once k are held, only keys above the k-th largest can enter (an equal key
    comes later, so it loses the tie)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []
        self.held = 0
        self.floor: torch.Tensor | None = None  # the k-th largest key so far, once k are held

    def feed(self, keys: torch.Tensor, offset: int) -> None:
        if self.floor is None:
            pos = torch.arange(offset, offset + keys.numel(), device=keys.device)
            keys = keys.clone()
        else:
            pos = torch.nonzero(keys > self.floor).squeeze(1)
            keys = keys[pos]
            pos += offset
        self.keys.append(keys)
        self.pos.append(pos)
        self.held += keys.numel()
        if self.held >= 2 * self.k:
            self._shrink()

    def _shrink(self) -> None:
        """Keep the k largest, ties to the lowest positions, in increasing positions (the
        order the candidates are held in)."""
        keys, pos = torch.cat(self.keys), torch.cat(self.pos)
        if keys.numel() > self.k:
            kth = kth_largest(keys, self.k)
            keep = keys > kth
            ties = torch.nonzero(keys == kth).squeeze(1)
            keep[ties[: self.k - int(keep.sum())]] = True
            kept = torch.nonzero(keep).squeeze(1)
            keys, pos = keys[kept], pos[kept]
            self.floor = kth
        self.keys, self.pos, self.held = [keys], [pos], keys.numel()

    def positions(self) -> torch.Tensor:
        """The k positions (all, if fewer were fed), in increasing order."""
        self._shrink()
        return self.pos[0]


class UpdateCompression(RoundHook):
    """``--compress`` (and ``--error-feedback``) as a round hook: each client's model
    becomes the start plus its decoded upload before it joins the payload; the bytes of
    every upload go in the row. Placed after the diagnostics (they measure the true
    update) and before DP-FedAvg (the clip then bounds what is actually sent)."""

    def __init__(
        self,
        spec: CompressionSpec,
        numel: int,
        n_clients: int,
        seed: int,
        error_feedback: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.spec, self.seed, self.n_clients = spec, seed, n_clients
        self.device = torch.device(device)
        self.compressor = Compressor(spec, numel, error_feedback)
        self.error_feedback = error_feedback
        self.residuals: dict[int, torch.Tensor] = {}  # client -> what its uploads dropped
        self.uploaded = np.zeros(2 * n_clients)  # bytes each client uploaded | 1 if it did

    @classmethod
    def from_config(
        cls, cfg: Config, numel: int, n_clients: int, device: torch.device | str
    ) -> UpdateCompression | None:
        """The hook ``cfg`` asks for, or None (``--compress none``)."""
        spec = CompressionSpec.parse(cfg.compress)
        if spec.kind == "none":
            return None
        return cls(spec, numel, n_clients, cfg.seed, cfg.error_feedback, device)

    def describe(self) -> str:
        numel = self.compressor.numel
        sent = self.compressor.upload_bytes
        feedback = ", error feedback (one residual per client on its rank)"
        return (
            f"compression: {self.spec} uploads {sent:,} bytes per client and round "
            f"({sent / (4 * numel):.2%} of fp32's {4 * numel:,})"
            + (feedback if self.error_feedback else "")
        )

    # ---------------------------------------------------------------- as a round hook

    def start(self, ctx: RoundContext) -> None:
        self.uploaded[:] = 0.0

    def client_update(
        self, ctx: RoundContext, client: int, weight: float, norm: float
    ) -> float | None:
        residual = self.residual(client) if self.error_feedback else None
        self.compressor.apply(
            ctx.params, ctx.start, residual, stream_seed(self.seed, client, ctx.round)
        )
        self.uploaded[client] = self.compressor.upload_bytes
        self.uploaded[self.n_clients + client] = 1.0
        return math.nan  # the sent update's norm: whoever needs it (DP's clip) measures it

    def row(self, ctx: RoundContext) -> dict:
        """Every client's upload in bytes (NaN: it uploaded nothing), one small Allreduce."""
        from mpi4py import MPI

        gathered = self.uploaded.copy()
        ctx.world.comm.Allreduce(MPI.IN_PLACE, gathered, op=MPI.SUM)
        sent, came = np.split(gathered, 2)
        return {rk.CLIENT_UPLOAD_BYTES: np.where(came > 0, sent, np.nan)}

    # ---------------------------------------------------------------- per-client state

    def residual(self, client: int) -> torch.Tensor:
        """``client``'s residual (zeros until its first upload)."""
        if client not in self.residuals:
            self.residuals[client] = flat_zeros(self.compressor.numel, self.device)
        return self.residuals[client]

    def state_arrays(self, client: int) -> dict[str, np.ndarray] | None:
        """For the checkpoint: the client's residual (None: it has not trained yet)."""
        residual = self.residuals.get(client)
        if residual is None:
            return None
        return {"residual": residual.detach().cpu().numpy().copy()}

    def load_state(self, client: int, arrays: dict[str, np.ndarray]) -> None:
        """Restore ``state_arrays`` bit for bit (on the hook's device)."""
        values = np.asarray(arrays["residual"], dtype=np.float32)
        if values.shape != (self.compressor.numel,):
            raise ValueError(
                f"client {client}'s residual holds {values.size} values, the model "
                f"{self.compressor.numel}"
            )
        self.residual(client).copy_(torch.from_numpy(values))
