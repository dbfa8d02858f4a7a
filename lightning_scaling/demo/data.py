"""Byte-level language-modelling data built from the running interpreter's own standard library.

Every machine that runs Python has the standard library's ``.py`` sources, so this gives real text with no
download. Files are split into train and validation *by file* with a hash of their relative path (stable across
machines and runs), concatenated in a hash-determined order, and served as windows of ``block_size + 1`` bytes:
``x = window[:-1]``, ``y = window[1:]`` (vocabulary 256).
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["StdlibTextDataModule", "StdlibTextDataset", "load_stdlib_bytes", "stdlib_files", "DEFAULT_MAX_BYTES"]

#: Default cap on the bytes loaded per split: ~4 MB of train text loads in well under a second and is more than
#: a CPU demo can consume (a 64-byte context, batch 16, 1,000 steps uses ~1 MB).
DEFAULT_MAX_BYTES = 4_000_000

# Vendored or generated trees that are not representative "stdlib source" or differ a lot between installs.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"})


def _path_hash(rel: str) -> int:
    # crc32 is stable across processes and Python versions (unlike hash(), which is salted).
    return zlib.crc32(rel.encode("utf-8"))


def stdlib_files(*, root: str | os.PathLike[str] | None = None) -> list[str]:
    """List the relative paths of the standard library's ``.py`` files, sorted.

    Args:
        root: Folder to scan; default ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        Relative POSIX paths, sorted.

    Example::

        >>> files = stdlib_files()
        >>> any(f.endswith("os.py") for f in files)
        True
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library folder not found: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fname in filenames:
            if fname.endswith(".py"):
                out.append(Path(dirpath, fname).relative_to(root).as_posix())
    return sorted(out)


def _is_val(rel: str, val_fraction: float) -> bool:
    return (_path_hash("split:" + rel) % 10_000) < int(round(val_fraction * 10_000))


@functools.lru_cache(maxsize=8)
def _load_cached(root: str, split: str, max_bytes: int | None, val_fraction: float) -> np.ndarray:
    files = [f for f in stdlib_files(root=root) if _is_val(f, val_fraction) == (split == "val")]
    # Deterministic shuffle of the file order so a byte cap still samples many modules, not just "a*.py".
    files.sort(key=lambda f: (_path_hash("order:" + f), f))
    chunks, total = [], 0
    for rel in files:
        try:
            data = Path(root, rel).read_bytes()
        except OSError:
            continue
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    arr = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr


def load_stdlib_bytes(
    split: str = "train",
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    val_fraction: float = 0.1,
    root: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Concatenated bytes of the standard library's sources for one split (cached in memory).

    Args:
        split: ``"train"`` or ``"val"``.
        max_bytes: Cap on the number of bytes returned (``None``: all files of the split).
        val_fraction: Fraction of files (by hash of relative path) that go to validation.
        root: Folder to scan; default ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        A read-only ``uint8`` array.

    Example::

        >>> train = load_stdlib_bytes("train", max_bytes=100_000)
        >>> train.dtype, len(train)
        (dtype('uint8'), 100000)
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = str(root if root is not None else sysconfig.get_paths()["stdlib"])
    arr = _load_cached(root, split, None if max_bytes is None else int(max_bytes), float(val_fraction))
    if len(arr) == 0:
        raise ValueError(f"no standard-library .py files found under {root} for split {split!r}")
    return arr


class StdlibTextDataset(Dataset):
    """Non-overlapping windows of ``block_size + 1`` bytes over the standard-library text.

    Item ``i`` is ``(x, y)`` with ``x = data[i*T : i*T + T]`` and ``y = data[i*T + 1 : i*T + T + 1]`` as
    ``int64`` tensors of length ``T = block_size``. Shuffle with the DataLoader.

    Args:
        split: ``"train"`` or ``"val"``.
        block_size: Context length T in bytes (tokens).
        max_bytes: Cap on the bytes loaded (see :func:`load_stdlib_bytes`).
        val_fraction: Fraction of files used for validation.
        root: Folder to scan instead of the running interpreter's stdlib.

    Example::

        >>> ds = StdlibTextDataset("train", block_size=8, max_bytes=10_000)
        >>> x, y = ds[0]
        >>> x.shape, bool((x[1:] == y[:-1]).all())
        (torch.Size([8]), True)
    """

    def __init__(
        self,
        split: str = "train",
        *,
        block_size: int = 64,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        val_fraction: float = 0.1,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.data = torch.from_numpy(
            np.asarray(load_stdlib_bytes(split, max_bytes=max_bytes, val_fraction=val_fraction, root=root)).copy()
        )
        self.n_windows = (len(self.data) - 1) // self.block_size
        if self.n_windows < 1:
            raise ValueError(f"{split} split has {len(self.data)} bytes: too few for block_size={block_size}")

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n_windows <= i < self.n_windows:
            raise IndexError(i)
        i %= self.n_windows
        start = i * self.block_size
        chunk = self.data[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class StdlibTextDataModule(pl.LightningDataModule):
    """LightningDataModule over :class:`StdlibTextDataset` (byte-level LM on the Python standard library).

    ``batch_size`` is the per-device micro-batch; ``tokens_per_sample`` equals ``block_size`` (hand it to
    ``LossTrajectory(tokens_per_sample=...)``).

    Args:
        block_size: Context length in bytes.
        batch_size: Samples per micro-batch per device.
        num_workers: DataLoader workers.
        max_bytes: Cap on the bytes loaded per split.
        val_bytes: Cap on validation bytes (default ``max_bytes // 8``; keeps evaluation cheap).
        val_fraction: Fraction of files used for validation.
        seed: Seed of the training shuffle (the data split itself never depends on it).

    Example::

        >>> dm = StdlibTextDataModule(block_size=32, batch_size=4, max_bytes=50_000)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape)
        (4, 32)
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        val_bytes: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.max_bytes = max_bytes
        if val_bytes is None and max_bytes is not None:
            val_bytes = max(max_bytes // 8, 4096)
        self.val_bytes = val_bytes
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.train_set: StdlibTextDataset | None = None
        self.val_set: StdlibTextDataset | None = None

    @property
    def tokens_per_sample(self) -> int:
        """Tokens (bytes) per training sample."""
        return self.block_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = StdlibTextDataset(
                "train", block_size=self.block_size, max_bytes=self.max_bytes, val_fraction=self.val_fraction
            )
        if self.val_set is None:
            self.val_set = StdlibTextDataset(
                "val", block_size=self.block_size, max_bytes=self.val_bytes, val_fraction=self.val_fraction
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=gen,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
