"""A sorted, vectorised lookup table over many unique strings (a cache's keys).

Memory is proportional to the total length of the keys, not to the longest key times their
count: the keys live in one byte string, and the sorted search array holds each key cut to a
width of at most twice the mean length. A query that reaches that width is confirmed against
the full key; every other query is answered by numpy alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIN_WIDTH = 16


class KeyTable:
    """keys: utf-8 bytes, unique. `find` returns each query's position in `keys` (or -1)."""

    def __init__(self, keys: Sequence[bytes]):
        n = len(keys)
        lengths = np.fromiter(map(len, keys), np.int64, n)
        self._offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._blob = b"".join(keys)
        longest = int(lengths.max(initial=1))
        mean = math.ceil(len(self._blob) / max(n, 1))
        self.width = max(1, min(longest, max(MIN_WIDTH, 2 * mean)))
        prefixes = np.array(keys, dtype=f"S{self.width}")  # numpy cuts longer keys to the width
        self._order = np.argsort(prefixes, kind="stable")
        self._sorted = prefixes[self._order]
        del prefixes

    def __len__(self) -> int:
        return len(self._order)

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._offsets.nbytes + self._order.nbytes + self._sorted.nbytes

    def key(self, i: int) -> str:
        return self._blob[self._offsets[i] : self._offsets[i + 1]].decode()

    def keys(self) -> list[str]:
        o = self._offsets.tolist()
        return [self._blob[o[i] : o[i + 1]].decode() for i in range(len(self))]

    def find(self, queries: Sequence[str]) -> np.ndarray:
        """Position in `keys` of each query, -1 where it is absent."""
        q = [s.encode() for s in queries]
        if not len(self) or not q:
            return np.full(len(q), -1, np.int64)
        qa = np.array(q, dtype=f"S{self.width}")
        lo = np.searchsorted(self._sorted, qa, "left")
        hi = np.searchsorted(self._sorted, qa, "right")
        out = np.where(hi > lo, self._order[np.minimum(lo, len(self) - 1)], -1)
        # A query shorter than the width equals its match outright; a longer one only shares
        # the cut prefix with the candidates, so compare the full keys.
        qlen = np.fromiter(map(len, q), np.int64, len(q))
        for i in np.nonzero((hi > lo) & (qlen >= self.width))[0].tolist():
            out[i] = self._scan(q[i], int(lo[i]), int(hi[i]))
        return out

    def _scan(self, query: bytes, lo: int, hi: int) -> int:
        o = self._offsets
        for j in self._order[lo:hi].tolist():
            if self._blob[o[j] : o[j + 1]] == query:
                return j
        return -1
