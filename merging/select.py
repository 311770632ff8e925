"""Exact order statistics (k-th smallest value) of a population streamed in chunks, in bounded memory.

``StreamSelect``: pass 1 reads a sample of the population (any subset: it only has to be representative for
speed, not for correctness) and brackets each wanted rank between two sample values; pass 2 counts the values
below the bracket and keeps the few inside it; the k-th smallest is then found exactly inside the bracket. If a
bracket missed its rank (rare), ``OrderStats`` finishes: radix select on the fp32 bit pattern, pass 1 histograms
the high 16 bits of an order-preserving integer key, pass 2 the low 16 bits within the bins holding the ranks.
Either way the result is exactly ``sorted(values)[k - 1]``. In memory, ``order_stats`` does the same on one
tensor (``torch.kthvalue`` for at most ``SMALL`` entries).
"""

from __future__ import annotations

import numpy as np
import torch

SMALL = 1 << 16
_BINS = 1 << 16


def _keys(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 in [0, 2^32) with the same order (negative floats flip their magnitude bits)."""
    b = x.float().contiguous().view(torch.int32)
    k = torch.bitwise_xor(b, torch.bitwise_and(b >> 31, 0x7FFFFFFF))  # signed-int order == float order
    return k.to(torch.int64) + (1 << 31)


def _value(key: int) -> float:
    k = torch.tensor([key - (1 << 31)], dtype=torch.int64).to(torch.int32)
    b = torch.bitwise_xor(k, torch.bitwise_and(k >> 31, 0x7FFFFFFF))
    return b.view(torch.float32).item()


class OrderStats:
    """k-th smallest values (1-based ``ranks``) of each of N value streams; feed ``[N, m]`` chunks.

    Usage: ``for p in range(s.passes): for chunk: s.update(values_Nm); s.end_pass()`` then ``s.result()``
    -> ``[N, len(ranks)]``. ``ranks`` may be a callable of the population size per model (known after pass 1).
    """

    passes = 2

    def __init__(self, ranks):
        self._ranks = ranks
        self._pass = 0
        self._count = 0
        self._hi: torch.Tensor | None = None  # [N, BINS]
        self._lo: dict[tuple[int, int], torch.Tensor] = {}
        self._targets: list[list[tuple[int, int]]] = []  # per model: (hi bin, rank within the bin)

    def ranks(self) -> list[int]:
        ranks = self._ranks(self._count) if callable(self._ranks) else list(self._ranks)
        for k in ranks:
            if not 1 <= k <= self._count:
                raise ValueError(f"rank {k} outside 1..{self._count}")
        return ranks

    def update(self, values: torch.Tensor) -> None:
        n = values.shape[0]
        if self._pass == 0:
            if self._hi is None:
                self._hi = torch.zeros(n, _BINS, dtype=torch.int64)
            self._count += values.shape[1]
            for i in range(n):
                self._hi[i] += torch.bincount(_keys(values[i]) >> 16, minlength=_BINS)
        else:
            for i in range(n):
                keys = _keys(values[i])
                hi = keys >> 16
                for b in sorted({b for b, _ in self._targets[i]}):
                    self._lo[(i, b)] += torch.bincount(keys[hi == b] & 0xFFFF, minlength=_BINS)

    def end_pass(self) -> None:
        if self._pass == 0:
            cum = self._hi.cumsum(1)
            ranks = self.ranks()
            for i in range(self._hi.shape[0]):
                targets = []
                for k in ranks:
                    b = int(torch.searchsorted(cum[i], torch.tensor([k]), right=False).item())
                    before = int(cum[i, b - 1]) if b > 0 else 0
                    targets.append((b, k - before))
                self._targets.append(targets)
            pending = {(i, b) for i, t in enumerate(self._targets) for b, _ in t}
            self._lo = {key: torch.zeros(_BINS, dtype=torch.int64) for key in pending}
        self._pass += 1

    def result(self) -> torch.Tensor:
        out = torch.empty(len(self._targets), len(self._targets[0]) if self._targets else 0)
        for i, targets in enumerate(self._targets):
            for j, (b, r) in enumerate(targets):
                lo = int(torch.searchsorted(self._lo[(i, b)].cumsum(0), torch.tensor([r]), right=False).item())
                out[i, j] = _value((b << 16) | lo)
        return out


def _split_band(band: np.ndarray, lo: float, hi: float) -> tuple[int, torch.Tensor, int]:
    """(count == lo, the values strictly inside, count == hi) of values in [lo, hi]: atoms (e.g. the many exact
    zeros of sparse task vectors) are counted, not stored. numpy: its SIMD compares and counts are about 6x
    torch's bool masks on the CPU."""
    at_lo = int(np.count_nonzero(band == lo))
    at_hi = int(np.count_nonzero(band == hi)) if hi != lo else 0
    return at_lo, torch.from_numpy(band[(band > lo) & (band < hi)]), at_hi


def _pick(k: int, below: int, at_lo: int, inner: torch.Tensor, at_hi: int, lo: float, hi: float) -> float | None:
    """The k-th smallest given the counts around a bracket; None when the bracket does not hold rank k."""
    k -= below
    if k <= 0:
        return None
    if k <= at_lo:
        return lo
    k -= at_lo
    if k <= inner.numel():
        return inner.kthvalue(k).values.item()
    return hi if k - inner.numel() <= at_hi else None


def _bracketed(v: torch.Tensor, k: int) -> float | None:
    """k-th smallest of a 1-D ``v`` from a strided sample: the sample brackets the answer, one pass counts the
    entries below the bracket and gathers those inside it. None when the bracket missed (then use radix).

    When the sample puts rank k on a run of equal values (an atom: the exact zeros of a sparse task vector), that
    value is tried first with two counts and nothing gathered."""
    m = v.numel()
    sample = v[:: max(1, m // 16384)].sort().values
    lo, hi = _bracket(sample, k, m)
    guess = sample[min(sample.numel() - 1, int((k - 0.5) / m * sample.numel()))].item()
    v = v.numpy()
    if guess in (lo, hi):
        below = int(np.count_nonzero(v < guess))
        if below < k <= below + int(np.count_nonzero(v == guess)):
            return guess
    below = int(np.count_nonzero(v < lo))
    return _pick(k, below, *_split_band(v[(v >= lo) & (v <= hi)], lo, hi), lo, hi)


def order_stats(values: torch.Tensor, ranks) -> torch.Tensor:
    """k-th smallest of each row of an in-memory ``[N, m]`` tensor, ``[N, len(ranks)]``; exact."""
    m = values.shape[1]
    ks = ranks(m) if callable(ranks) else list(ranks)
    for k in ks:
        if not 1 <= k <= m:
            raise ValueError(f"rank {k} outside 1..{m}")
    if m <= SMALL:
        return torch.stack([values.float().kthvalue(k, dim=1).values for k in ks], dim=1)
    found = [[_bracketed(values[i], k) for k in ks] for i in range(values.shape[0])]
    if all(x is not None for row in found for x in row):
        return torch.tensor(found, dtype=torch.float32)
    s = OrderStats(ks)
    for _ in range(s.passes):
        s.update(values)
        s.end_pass()
    return s.result()


SAMPLE = 1 << 16


def _bracket(sample: torch.Tensor, k: int, m: int) -> tuple[float, float]:
    """Sample values around rank k of m (the ends open to -inf / inf): about 6 sigma of sampling error."""
    n = sample.numel()
    at = (k - 0.5) / m * n
    margin = 6.0 * (at * max(0.0, 1 - at / n)) ** 0.5 + 16
    i, j = int(at - margin), int(at + margin) + 1
    return (sample[i].item() if i > 0 else -float("inf")), (sample[j].item() if j < n - 1 else float("inf"))


def _atom_or_bracket(sample: torch.Tensor, k: int, m: int) -> tuple[float, float]:
    """The bracket of rank k, collapsed to one value when the sample puts rank k on a run of equal values."""
    lo, hi = _bracket(sample, k, m)
    guess = sample[min(sample.numel() - 1, int((k - 0.5) / m * sample.numel()))].item()
    return (guess, guess) if guess in (lo, hi) else (lo, hi)


class StreamSelect:
    """k-th smallest values (1-based ``ranks(size)``) of N value streams of ``size`` entries each.

    ``for p in range(s.passes): feed; s.end_pass()`` then ``s.result()`` -> ``[N, len(ranks)]``. In pass 0 feed
    a sample (``update(values)``, any subset); in later passes feed every value. ``passes`` grows from 2 to 4
    when a bracket missed.
    """

    def __init__(self, ranks, size: int):
        self.size = size
        self.ks = ranks(size) if callable(ranks) else list(ranks)
        for k in self.ks:
            if not 1 <= k <= size:
                raise ValueError(f"rank {k} outside 1..{size}")
        self.passes = 2
        self._pass = 0
        self._sample: list[torch.Tensor] = []
        self._radix: OrderStats | None = None
        self._found: torch.Tensor | None = None

    @property
    def sampling(self) -> bool:
        return self._pass == 0

    def update(self, values: torch.Tensor) -> None:
        if self._pass == 0:
            self._sample.append(values.float().clone())
        elif self._pass == 1:
            for i in range(values.shape[0]):
                v = values[i].numpy()
                for j, (lo, hi) in enumerate(self._brackets[i]):
                    if lo == hi:  # an atom: count it, gather nothing
                        at_lo, inner, at_hi = int(np.count_nonzero(v == lo)), None, 0
                    else:
                        at_lo, inner, at_hi = _split_band(v[(v >= lo) & (v <= hi)], lo, hi)
                        self._band[i][j].append(inner)
                    acc = self._below[i][j]
                    self._below[i][j] = (acc[0] + int(np.count_nonzero(v < lo)), acc[1] + at_lo, acc[2] + at_hi)
        else:
            self._radix.update(values)

    def end_pass(self) -> None:
        if self._pass == 0:
            sample = torch.cat(self._sample, dim=1).sort(dim=1).values
            self._sample = []
            self._brackets = [[_atom_or_bracket(sample[i], k, self.size) for k in self.ks]
                              for i in range(sample.shape[0])]  # fmt: skip
            self._below = [[(0, 0, 0)] * len(self.ks) for _ in self._brackets]
            self._band = [[[] for _ in self.ks] for _ in self._brackets]
        elif self._pass == 1:
            found = torch.empty(len(self._brackets), len(self.ks))
            for i in range(found.shape[0]):
                for j, k in enumerate(self.ks):
                    inner = torch.cat(self._band[i][j]) if self._band[i][j] else torch.empty(0)
                    below, at_lo, at_hi = self._below[i][j]
                    value = _pick(k, below, at_lo, inner, at_hi, *self._brackets[i][j])
                    if value is None:
                        self.passes = 4
                        self._radix = OrderStats(self.ks)
                        break
                    found[i, j] = value
                if self._radix is not None:
                    break
            self._band = []
            self._found = None if self._radix is not None else found
        else:
            self._radix.end_pass()
        self._pass += 1

    def result(self) -> torch.Tensor:
        return self._found if self._radix is None else self._radix.result()
