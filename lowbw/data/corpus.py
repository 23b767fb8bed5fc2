"""Byte-level text data: the bundled corpus or any UTF-8 file, a fixed validation tail, batches.

Samples are fixed windows of ``block_size + 1`` bytes at stride ``block_size`` over the training
split, so every sample has a stable index (per-sample codecs key their caches on it). Each step
draws ``batch_size`` sample indices from a per-epoch permutation seeded by the run's seed: every
rank computes the same batch with no communication.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from lowbw.errors import ConfigError

BUNDLED = "tinyshakespeare.txt.gz"  # public domain (see lowbw/data/README.md)
BUNDLED_BYTES = 1_115_394  # its length once decompressed (tests/test_config_errors.py checks it)
_NEVER = 10**18  # more bytes than any file holds


def min_bytes(block_size: int, val_fraction: float) -> int:
    """Smallest file that yields one training and one validation window of block_size + 1 bytes.

    Both splits need block_size + 1 bytes: n * (1 - val_fraction) >= block_size + 1 and the tail
    n - int(n * (1 - val_fraction)) > block_size, i.e. n > block_size / val_fraction. Computed in closed
    form and confirmed by a few steps of the exact rule (rounding), so it takes no time whatever the
    fraction."""
    def fits(n: int) -> bool:
        split = int(n * (1 - val_fraction))
        return (split - 1) // block_size >= 1 and (n - split - 1) // block_size >= 1

    if not 0 < val_fraction < 1 or max(block_size / val_fraction, (block_size + 1) / (1 - val_fraction)) >= _NEVER:
        return _NEVER
    estimate = max(2 * (block_size + 1), math.ceil((block_size + 1) / (1 - val_fraction)),
                   math.floor(block_size / val_fraction) + 1)
    for n in range(max(2 * (block_size + 1), estimate - 4), estimate + 1000):
        if fits(n):
            return n
    return estimate  # beyond float precision (a fraction near 1e-12): the exact answer of the inequalities


def check_text_file(path: str, min_bytes: int) -> None:
    """Reject a missing, empty, binary or too-short data file with one sentence naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.path={path!r} does not exist or is not a file; give a UTF-8 text file")
    size = p.stat().st_size
    if size == 0:
        raise ConfigError(f"data.path={path!r} is empty; give a UTF-8 text file with some text in it")
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    if b"\0" in head:
        raise ConfigError(f"data.path={path!r} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a multi-byte character cut at the read boundary is fine
            raise ConfigError(f"data.path={path!r} is not UTF-8 text (bad byte at offset {e.start})") from None
    if size < min_bytes:
        raise ConfigError(
            f"data.path={path!r} has {size} bytes, fewer than the {min_bytes} needed for one training and "
            "one validation sample; use a longer file or a smaller model.block_size"
        )


def load_bytes(path: str | None) -> np.ndarray:
    if path is None:
        with resources.files("lowbw.data").joinpath(BUNDLED).open("rb") as f:
            raw = gzip.decompress(f.read())
    else:
        raw = Path(path).expanduser().read_bytes()
    return np.frombuffer(raw, dtype=np.uint8)


@dataclass
class Batch:
    x: torch.Tensor  # [B, T] int64 input bytes
    y: torch.Tensor  # [B, T] int64 next bytes
    ids: torch.Tensor  # [B] int64 sample indices (train) or window indices (val)


class Corpus:
    def __init__(self, path: str | None, block_size: int, val_fraction: float, seed: int):
        data = load_bytes(path)
        split = int(len(data) * (1 - val_fraction))
        self.train, self.val = data[:split], data[split:]
        self.T, self.seed = block_size, seed
        self.n_train = (len(self.train) - 1) // block_size
        self.n_val = (len(self.val) - 1) // block_size
        if self.n_train < 1 or self.n_val < 1:
            where = path or BUNDLED
            raise ConfigError(
                f"data {where!r} is too short for model.block_size={block_size}: it yields {self.n_train} training "
                f"and {self.n_val} validation samples; use more text or a smaller block_size"
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _windows(self, data: np.ndarray, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = ids[:, None] * self.T + np.arange(self.T + 1)[None, :]
        w = torch.from_numpy(data[offsets].astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """The batch of optimizer step ``step`` (0-based); identical on every rank."""
        start = step * batch_size
        ids = np.empty(batch_size, dtype=np.int64)
        for k in range(batch_size):
            epoch, pos = divmod(start + k, self.n_train)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
                self._perm_epoch = epoch
            ids[k] = self._perm[pos]
        x, y = self._windows(self.train, ids)
        return Batch(x, y, torch.from_numpy(ids))

    def val_batch(self, index: int, batch_size: int) -> Batch:
        """A fixed validation batch: evenly spaced windows over the held-out tail."""
        n = batch_size
        stride = max(1, self.n_val // (n * 8))
        ids = (np.arange(n, dtype=np.int64) * stride + index * n * stride) % self.n_val
        x, y = self._windows(self.val, ids)
        return Batch(x, y, torch.from_numpy(ids))

