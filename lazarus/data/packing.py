"""Packing for SFT: several examples per row, each attending only to itself.

A packed row holds whole examples one after another (an example is never split across rows),
then padding up to the row length. ``segment_ids`` numbers the examples of a row 1, 2, ...
and gives the padding the next number, so the attention mask built from it
(:func:`lazarus.models.mlx_lm_patches.packed_attention`) is block-diagonal and causal: each
example sees only its own earlier tokens, and no row of the mask is ever empty. Rotary
positions restart at 0 for every example (patch 3 of :mod:`lazarus.models.mlx_lm_patches`), so
the logits equal the unpacked example's; architectures where that cannot hold (absolute
position embeddings, recurrent layers) are refused by ``check_packing_supported``.

Rows are planned once per run, a pure function of the example lengths, the row length and the
seed (:func:`pack`: the longest example left opens a row, the longest that still fits joins it,
and the row's last place goes to the pair of examples that fills it best); the order of the
rows is shuffled every epoch from ``(seed, epoch)`` like unpacked batches, so every epoch has the
same number of batches and resume continues mid-epoch exactly.

**Row length** (:func:`plan_rows`). For each multiple 1, 1.25, 1.5, 2, 3, 4, ... of the longest
example, in turn: the number of rows that length needs, and the length that spreads the tokens
evenly over that many rows (a little more when the examples do not fit it exactly); the
first that leaves under 2% padding is taken. Never longer than ``limit`` (``max_length``, else
the model's context). Rows are kept short because attention over a row costs its length
squared, masked pairs included; the row length is not rounded to ``pad_multiple`` (a run has one
row length, so there is no shape to save).
"""

from __future__ import annotations

import bisect
import warnings

import numpy as np

from lazarus.data.batching import DataLoader
from lazarus.data.datasets import DataError

#: Row lengths tried, as multiples of the longest example (the first that reaches TARGET_PADDING wins).
ROW_FACTORS = (1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
TARGET_PADDING = 0.02
_PACK_KEY = 0x7061636B  # "pack": the packing's own random stream, apart from the epochs' [seed, epoch]


class _Pool:
    """The examples not yet packed, grouped by size (each size a stack, in the seeded order)."""

    def __init__(self, sizes: np.ndarray, order: np.ndarray):
        self.stacks: dict[int, list[int]] = {}
        for i in order.tolist():
            self.stacks.setdefault(int(sizes[i]), []).append(i)
        self.sizes = sorted(self.stacks)  # the distinct sizes left

    def largest_fitting(self, room: int, twice: int | None = None) -> int | None:
        """The largest size left that is <= ``room`` (with ``twice``: a size equal to it only when
        two examples of it are left)."""
        k = bisect.bisect_right(self.sizes, room) - 1
        while k >= 0 and self.sizes[k] == twice and len(self.stacks[twice]) < 2:
            k -= 1
        return self.sizes[k] if k >= 0 else None

    def best_pair(self, room: int, beat: int, tries: int = 64) -> tuple[int, int] | None:
        """Two sizes ``a >= b`` left with ``beat < a + b <= room``, the sum as large as possible
        (``a`` among the ``tries`` largest sizes that fit)."""
        best, pair = beat, None
        k = bisect.bisect_right(self.sizes, room)
        for a in reversed(self.sizes[max(0, k - tries): k]):
            if 2 * a <= best:
                break
            b = self.largest_fitting(min(room - a, a), twice=a)
            if b is not None and a + b > best:
                best, pair = a + b, (a, b)
                if best == room:
                    break
        return pair

    def take(self, size: int) -> int:
        stack = self.stacks[size]
        i = stack.pop()
        if not stack:
            del self.stacks[size]
            self.sizes.pop(bisect.bisect_left(self.sizes, size))
        return i


def pack(sizes, capacity: int, seed: int = 0) -> list[list[int]]:
    """Indices of ``sizes`` grouped into rows whose sizes sum to at most ``capacity``, one row at a
    time: the largest item left opens a row, then the largest item that still fits joins it;
    when that item would be the row's last (nothing left fits after it), the pair of items
    that fills the row best is taken instead, if it fills more. Items of equal size are taken in
    an order drawn from ``seed``. Deterministic; never splits an item."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (int(sizes.max()) > capacity or int(sizes.min()) < 1):
        raise ValueError(f"item sizes must be in [1, {capacity}], got {int(sizes.min())}..{int(sizes.max())}")
    pool = _Pool(sizes, np.random.default_rng([seed, _PACK_KEY]).permutation(len(sizes)))
    rows: list[list[int]] = []
    while pool.sizes:
        first = pool.sizes[-1]
        row, room = [pool.take(first)], capacity - first
        while pool.sizes and pool.sizes[0] <= room:
            size = pool.largest_fitting(room)
            pair = pool.best_pair(room, size) if room - size < pool.sizes[0] else None
            for s in pair or (size,):
                row.append(pool.take(s))
                room -= s
        rows.append(row)
    return rows


def plan_rows(sizes, limit: int | None = None, seed: int = 0) -> tuple[int, list[list[int]]]:
    """``(row_length, rows)`` by the rule of the module docstring; sizes above ``limit`` count as
    ``limit`` (the caller truncates those examples)."""
    cap = int(limit) if limit is not None else np.iinfo(np.int64).max
    sizes = np.minimum(np.asarray(sizes, dtype=np.int64), cap)
    longest, total = int(sizes.max()), int(sizes.sum())
    best: tuple[float, int, list[list[int]]] | None = None
    for factor in ROW_FACTORS:
        aim = min(int(np.ceil(longest * factor)), cap)
        num_rows = -(-total // aim)
        length = max(longest, -(-total // num_rows))  # rows exactly full if the examples allow it
        for _ in range(16):  # else a little longer, until they fit into num_rows rows
            rows = pack(sizes, length, seed)
            if len(rows) <= num_rows or length >= cap:
                break
            length = min(cap, length + max(1, length // 256))
        padding = 1.0 - total / (len(rows) * length)
        if best is None or padding < best[0]:
            best = (padding, length, rows)
        if padding < TARGET_PADDING or aim >= cap:
            break
    return best[1], best[2]


def collate_packed(dataset, rows: list[list[int]], width: int) -> dict:
    """A packed batch of ``rows`` (lists of example indices): ``inputs``/``targets`` shifted by one
    within each example, ``mask`` on its response targets (all its targets with
    ``mask_prompt=False``), ``segment_ids`` (1, 2, ... per example, the next number on padding),
    ``loss_weight`` = ``num_tokens`` = the target tokens. Examples longer than ``width`` are cut."""
    import mlx.core as mx

    inputs = np.full((len(rows), width), dataset.pad_id, dtype=np.int32)
    targets = np.full((len(rows), width), dataset.pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    segments = np.zeros((len(rows), width), dtype=np.int32)
    for b, row in enumerate(rows):
        pos = 0
        for seg, i in enumerate(row, start=1):
            e = dataset.examples[i]
            ids = e.ids[: width + 1]
            n = len(ids) - 1
            inputs[b, pos: pos + n] = ids[:-1]
            targets[b, pos: pos + n] = ids[1:]
            for start, end in dataset.target_ranges(e):  # the reply, or every assistant turn of a conversation
                mask[b, pos + max(start, 0): pos + min(end, n)] = 1.0
            segments[b, pos: pos + n] = seg
            pos += n
        segments[b, pos:] = len(row) + 1
    ntok = int(mask.sum())
    return {"inputs": mx.array(inputs), "targets": mx.array(targets), "mask": mx.array(mask),
            "segment_ids": mx.array(segments), "loss_weight": mx.array(float(ntok)), "num_tokens": ntok,
            "indices": [i for row in rows for i in row]}


class PackedDataLoader(DataLoader):
    """A :class:`DataLoader` whose items are packed rows of an ``SFTDataset`` (see the module
    docstring): ``batch_size`` counts rows, each rank takes its contiguous share of a batch's
    rows, CPU-stream shards split a batch by rows, every batch is ``row_length`` wide.

    ``limit``: the longest row allowed (``max_length`` or the model's context). An example longer
    than the row is truncated with a warning; one whose prompt alone fills the row is a
    ``DataError`` naming its line. ``row_length`` fixes the row length instead of the rule."""

    def __init__(self, dataset, batch_size: int, *, limit: int | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, pad_multiple: int = 8, row_length: int | None = None):
        examples = getattr(dataset, "examples", None)
        if examples is None or not all(hasattr(e, "ids") and hasattr(e, "prompt_len") for e in examples[:1]):
            raise TypeError(f"packing needs an SFTDataset (examples with ids and prompt_len), got "
                            f"{type(dataset).__name__}")
        super().__init__(dataset, batch_size, shuffle=shuffle, seed=seed, bucket=False, drop_last=drop_last,
                         pad_multiple=pad_multiple, collate_fn=self._collate)
        sizes = np.array([len(e.ids) - 1 for e in examples], dtype=np.int64)
        keep = np.flatnonzero(sizes > 0)  # a one-token example has no target: nothing to pack
        if row_length is None:
            row_length, rows = plan_rows(sizes[keep], limit, seed)
        else:
            rows = pack(np.minimum(sizes[keep], row_length), row_length, seed)
        self.row_length = int(row_length)
        self.rows = [[int(keep[j]) for j in row] for row in rows]
        self._check_fit(sizes)
        self._lengths = np.array([int(np.minimum(sizes[row], self.row_length).sum()) for row in self.rows])

    def _check_fit(self, sizes) -> None:
        cut = np.flatnonzero(sizes > self.row_length)
        for i in cut.tolist():
            e = self.dataset.examples[i]
            if e.prompt_len > self.row_length:
                raise DataError(getattr(self.dataset, "path", "dataset"), e.line, None,
                                f"prompt alone is {e.prompt_len} tokens, which does not fit a packed row of "
                                f"{self.row_length} tokens (max_length)")
        if len(cut):
            warnings.warn(f"packing: {len(cut)} examples longer than the packed row ({self.row_length} tokens) "
                          "are truncated to it", stacklevel=3)

    def _make_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        n = len(self.rows)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        return [order[i: i + self.batch_size] for i in range(0, n, self.batch_size)]

    def _padded_width(self, indices) -> int:
        return self.row_length

    def _collate(self, row_ids, pad_multiple: int | None = None) -> dict:
        return collate_packed(self.dataset, [self.rows[r] for r in row_ids], self.row_length)

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of padded positions in this epoch's packed rows."""
        batches = self.epoch_batches(epoch)
        total = self.row_length * sum(len(b) for b in batches)
        used = sum(int(self._lengths[b].sum()) for b in batches)
        return (total - used) / total if total else 0.0

    def describe(self) -> str:
        n = sum(len(r) for r in self.rows)
        return (f"{len(self.rows)} rows of {self.row_length} tokens from {n} examples, "
                f"{100 * self.padding_fraction(0):.1f}% padding")

    def state_dict(self) -> dict:
        return dict(super().state_dict(), packing=self.row_length)
