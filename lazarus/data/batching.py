"""Seeded, resumable, length-bucketed batching with a global batch split across ranks."""

from __future__ import annotations

from typing import Callable

import numpy as np


class DataLoader:
    """Yields the batches of one epoch in a deterministic order from ``(seed, epoch)``.

    ``batch_size`` is the *global* batch: under ``mx.distributed`` each of the
    ``world_size`` ranks collates its contiguous share. With ``bucket=True`` the epoch's
    shuffled indices are cut into chunks of ``bucket_batches`` batches, each chunk is sorted
    by length and sliced into batches, and the batch order is shuffled again: batches hold
    similar lengths (little padding) yet the order stays random. A trailing batch that
    cannot be split evenly across ranks is dropped; ``drop_last`` drops any short one.

    The Loop tracks the epoch and position; ``get_batch(epoch, i)`` is a pure function of
    them, which is what makes resume exact.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, bucket: bool = True,
                 bucket_batches: int = 32, drop_last: bool = False, pad_multiple: int = 8,
                 collate_fn: Callable | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.bucket = bucket
        self.bucket_batches = bucket_batches
        self.drop_last = drop_last
        self.pad_multiple = pad_multiple
        self.collate_fn = collate_fn or dataset.collate
        self.rank, self.world_size = 0, 1
        #: resume on data whose size or tokens differ from the checkpoint's (``--allow-data-change``)
        self.allow_data_change = False
        self._lengths = np.asarray(dataset.lengths()) if hasattr(dataset, "lengths") else None
        self._cache: dict[int, list[np.ndarray]] = {}

    def set_distributed(self, rank: int, world_size: int) -> None:
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} is the global batch and must be divisible by the "
                             f"number of ranks ({world_size})")
        self.rank, self.world_size = rank, world_size
        self._cache.clear()

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch in self._cache:
            return self._cache[epoch]
        batches = self._make_batches(np.random.default_rng([self.seed, epoch]))
        # Filter after shuffling so the order of the kept batches does not depend on the rank count.
        keep = [b for b in batches
                if len(b) == self.batch_size or not (self.drop_last or len(b) % self.world_size)]
        self._cache[epoch] = keep
        while len(self._cache) > 2:  # epoch 0 (for len) and the current one are enough
            self._cache.pop(next(k for k in self._cache if k != 0 and k != epoch))
        return keep

    def _make_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The epoch's batches (arrays of item indices) from the epoch's generator, before the
        rank filter. Items are examples here; a subclass may batch other units (packed rows)."""
        n = len(self.dataset)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[np.ndarray] = []
        if self.bucket and self._lengths is not None:
            chunk = self.batch_size * self.bucket_batches
            for s in range(0, n, chunk):
                part = order[s: s + chunk]
                part = part[np.argsort(self._lengths[part], kind="stable")]
                batches.extend(part[i: i + self.batch_size] for i in range(0, len(part), self.batch_size))
        else:
            batches = [order[i: i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.shuffle and self.bucket:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        return len(self.epoch_batches(0))

    def batch_indices(self, epoch: int, i: int) -> list[int]:
        """This rank's share of global batch ``i`` of ``epoch``."""
        b = self.epoch_batches(epoch)[i]
        per = len(b) // self.world_size
        return [int(x) for x in b[self.rank * per: (self.rank + 1) * per]]

    def get_batch(self, epoch: int, i: int) -> dict:
        return self.collate_fn(self.batch_indices(epoch, i), pad_multiple=self.pad_multiple)

    def get_batch_shards(self, epoch: int, i: int, shards: int) -> list[dict]:
        """This rank's share of batch ``i`` as up to ``shards`` contiguous parts (the Loop computes
        them concurrently on separate CPU streams). Every part is padded to the width of the
        whole batch, so the compiled step sees no more distinct shapes than without parts."""
        idx = self.batch_indices(epoch, i)
        parts = np.array_split(np.asarray(idx), min(max(1, shards), len(idx)))
        width = self._padded_width(idx) if self._lengths is not None else self.pad_multiple
        return [self.collate_fn([int(x) for x in part], pad_multiple=width) for part in parts]

    def _padded_width(self, indices) -> int:
        """A batch width for these examples: the longest of their lengths(), rounded up to pad_multiple."""
        return -(-int(self._lengths[indices].max()) // self.pad_multiple) * self.pad_multiple

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of padded positions in this epoch's batches (lower is better)."""
        if self._lengths is None:
            return 0.0
        pad = total = 0
        for b in self.epoch_batches(epoch):
            lens = self._lengths[b]
            width = self._padded_width(b)
            total += width * len(b)
            pad += width * len(b) - int(lens.sum())
        return pad / total if total else 0.0

    def state_dict(self) -> dict:
        fingerprint = getattr(self.dataset, "fingerprint", None)
        return {"seed": self.seed, "batch_size": self.batch_size, "num_examples": len(self.dataset),
                "shuffle": self.shuffle, "bucket": self.bucket,
                "fingerprint": fingerprint() if callable(fingerprint) else None}

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Refuse to resume on another data setup: order settings always; the examples (their count,
        and the hash of their tokens, so other data of the same size is caught too) unless
        ``allow_data_change``."""
        mine = self.state_dict()
        data_keys = ("num_examples", "fingerprint")
        diffs = [f"{k}: checkpoint {state[k]!r} vs now {mine[k]!r}" for k in mine
                 if k not in data_keys and k in state and state[k] != mine[k]]
        if diffs:
            raise ValueError(f"{source}: cannot resume exactly, the data setup changed ({'; '.join(diffs)})")
        if self.allow_data_change:
            return
        if state.get("num_examples", mine["num_examples"]) != mine["num_examples"]:
            raise ValueError(f"{source}: the training data changed: {state['num_examples']} examples in the "
                             f"checkpoint, {mine['num_examples']} now; pass --allow-data-change "
                             "(allow_data_change=True) to resume on the new data")
        if state.get("fingerprint") and mine["fingerprint"] and state["fingerprint"] != mine["fingerprint"]:
            raise ValueError(f"{source}: the training data changed since the checkpoint (same number of examples, "
                             "different tokens); pass --allow-data-change (allow_data_change=True) to resume on it")
