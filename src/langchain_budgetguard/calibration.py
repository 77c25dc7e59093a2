"""Learned corrections for the "typical" estimator, from the prompt counts providers report.

Each model key gets a ``Calibration``: a small ridge regression (relative least squares) of the reported
prompt tokens on a few features of the request (ASCII letters, digits, spaces, punctuation; characters of
2, 3 and 4 UTF-8 bytes, which separate Cyrillic/Arabic from CJK/Hangul from emoji; and the
estimator's own count of everything else: overheads, images, tools), fitted with exponential
forgetting, and a safety factor: the ``quantile`` (0.9 by default) of reported / predicted over
a sliding window of recent requests. An estimate is ``ceil(prediction * factor)``: about right,
and below the reported count for roughly ``1 - quantile`` of requests.

Where an exact tokenizer is used (one feature: its count) the regression is a single ratio.

Memory is bounded: the last ``window`` requests' features and a d x d matrix (d = 17) per key,
at most ``max_keys`` keys (least recently used dropped). ``observe`` is O(d^2) under a lock;
every 8th one refits (O(d^3 + window * d), ~1 ms), off the estimate path.
Nothing is persisted: a new process starts from the prior (the uncalibrated estimate).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence

__all__ = ["Calibration", "Calibrator"]


class Calibration:
    """The learned model for one key: ``predict(features) -> tokens`` once warmed up."""

    def __init__(self, prior: Sequence[float], *, quantile: float = 0.92, window: int = 256,
                 half_life: int = 256, min_observations: int = 24, ridge: float = 4.0) -> None:
        self.dim = len(prior)
        self.prior = [float(w) for w in prior]
        self.quantile = quantile
        self.min_observations = min_observations
        self.decay = 0.5 ** (1.0 / half_life)
        self.ridge = ridge
        self.xtx = [[0.0] * self.dim for _ in range(self.dim)]
        self.xty = [0.0] * self.dim
        self.scale = [0.0] * self.dim  # running mean of x_k^2: ridge strength per feature
        self.weights = list(self.prior)
        self.window: deque[tuple[tuple[float, ...], int]] = deque(maxlen=window)
        self.factor = 1.0
        self.observations = 0
        self._since_refit = 0

    @property
    def ready(self) -> bool:
        return self.observations >= self.min_observations

    def predict(self, features: Sequence[float]) -> float:
        return sum(w * x for w, x in zip(self.weights, features))

    def estimate(self, features: Sequence[float], fallback: int) -> int:
        """Calibrated tokens for ``features``, or ``fallback`` before enough observations."""
        if not self.ready:
            return fallback
        predicted = self.predict(features)
        if not math.isfinite(predicted) or predicted <= 0:
            return fallback
        return max(1, math.ceil(predicted * self.factor))

    def observe(self, features: Sequence[float], reported: int) -> None:
        d, decay = self.dim, self.decay
        xtx, xty, scale = self.xtx, self.xty, self.scale
        # Relative least squares (weight 1/reported^2): a 20-token request counts as much as a
        # 20,000-token one, so the ratio reported / predicted is centred for every size.
        x = [f / reported for f in features]
        for i in range(d):
            xi = x[i]
            row = xtx[i]
            if xi:
                for j in range(d):
                    row[j] = row[j] * decay + xi * x[j]
            else:
                for j in range(d):
                    row[j] *= decay
            xty[i] = xty[i] * decay + xi
            scale[i] = scale[i] * decay + xi * xi
        self.window.append((tuple(features), reported))
        self.observations += 1
        self._since_refit += 1
        if self._since_refit >= 8 or self.observations == self.min_observations:
            self._refit()

    def _refit(self) -> None:
        self._since_refit = 0
        d = self.dim
        # (X'X + lambda S) w = X'y + lambda S w0: ridge towards the prior, scaled per feature.
        a = [[self.xtx[i][j] + (self.ridge * (self.scale[i] or 1.0) * 1e-3 if i == j else 0.0)
              for j in range(d)] for i in range(d)]
        b = [self.xty[i] + self.ridge * (self.scale[i] or 1.0) * 1e-3 * self.prior[i] for i in range(d)]
        solved = _solve(a, b)
        weights = self.weights
        if solved is not None and all(math.isfinite(w) for w in solved):
            weights = [max(0.0, w) for w in solved]  # a negative weight extrapolates badly
        # The factor: the quantile of reported / predicted over the window, with the new weights.
        ratios = []
        for features, reported in self.window:
            predicted = sum(w * x for w, x in zip(weights, features))
            if predicted > 0:
                ratios.append(reported / predicted)
        if ratios:
            ratios.sort()
            k = min(len(ratios) - 1, max(0, math.ceil(self.quantile * len(ratios)) - 1))
            self.factor = max(ratios[k], 0.05)
        self.weights = weights


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None if singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        p = m[col][col]
        for r in range(col + 1, n):
            f = m[r][col] / p
            if f:
                mr, mc = m[r], m[col]
                for c in range(col, n + 1):
                    mr[c] -= f * mc[c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


class Calibrator:
    """Calibrations by model key, bounded in number, safe to share between threads."""

    def __init__(self, *, quantile: float = 0.92, window: int = 256, max_keys: int = 256,
                 min_observations: int = 24) -> None:
        if not 0.5 <= quantile < 1.0:
            raise ValueError(f"quantile: expected a number in [0.5, 1), got {quantile!r}")
        if not isinstance(window, int) or window < 8:
            raise ValueError(f"window: expected an int >= 8, got {window!r}")
        if not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys: expected a positive int, got {max_keys!r}")
        if not isinstance(min_observations, int) or min_observations < 1:
            raise ValueError(f"min_observations: expected a positive int, got {min_observations!r}")
        self.quantile, self.window, self.max_keys = quantile, window, max_keys
        self.min_observations = min_observations
        self._by_key: OrderedDict[tuple[str, int], Calibration] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, dim: int) -> Calibration | None:
        with self._lock:
            return self._by_key.get((key, dim))

    def observe(self, key: str, features: Sequence[float], prior: Sequence[float], reported: int) -> None:
        with self._lock:
            cal = self._by_key.get((key, len(features)))
            if cal is None:
                cal = Calibration(prior, quantile=self.quantile, window=self.window,
                                  min_observations=self.min_observations)
                self._by_key[(key, len(features))] = cal
                if len(self._by_key) > self.max_keys:
                    self._by_key.popitem(last=False)
            else:
                self._by_key.move_to_end((key, len(features)))
            cal.observe(features, reported)

    def keys(self) -> list[str]:
        with self._lock:
            return [k for k, _ in self._by_key]
