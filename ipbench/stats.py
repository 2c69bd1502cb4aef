"""How sure a number is: intervals for accuracies measured on a finite set of images, and paired
comparisons of two configurations measured on the SAME images.

On 1000 images a top-1 of 85 % has a 95 % interval of about ±2.2 points, yet two reducers run on
the same images can be told apart far more finely, because only the images on which they
disagree carry information (McNemar). Choices, each a named default:

* interval of one accuracy: Wilson's score interval (`INTERVAL`), which keeps its coverage near
  0.95 for accuracies close to 100 % where the normal (Wald) interval does not;
* paired test: McNemar's EXACT test (a two-sided binomial test on the discordant images);
* interval of a difference: a paired bootstrap over images (`BOOTSTRAP_RESAMPLES`, seeded);
* the resolvable difference: the smallest difference McNemar's test detects at `POWER` with the
  observed share of discordant images (normal approximation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _stats

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.80
INTERVAL = "wilson"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of `correct` out of `n`, in percent (scipy's binomtest)."""
    if n <= 0:
        return float("nan"), float("nan")
    ci = _stats.binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method=INTERVAL)
    return 100.0 * ci.low, 100.0 * ci.high


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant images at 1/2."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    return float(_stats.binomtest(min(a_only, b_only), n, 0.5).pvalue)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of mean(b) - mean(a) in points, resampling images (the pairs stay together)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = (b[idx] - a[idx]).mean(axis=1) * 100.0
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1.0 - tail))


def min_detectable(n: int, discordant: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest |difference| in points that McNemar's test finds at `power`, for `discordant`
    of `n` images disagreeing: (z_{1-alpha/2} + z_power) * sqrt(discordant share / n)."""
    if n <= 0:
        return float("nan")
    z = _stats.norm.ppf(1.0 - alpha / 2.0) + _stats.norm.ppf(power)
    return 100.0 * z * math.sqrt(max(discordant, 1) / n) / math.sqrt(n)


@dataclass(frozen=True)
class Comparison:
    """Configuration b against configuration a on the same images (numbers in percent/points)."""

    n: int
    correct_a: int  # images a gets right (top-1)
    correct_b: int
    a_only: int  # images a gets right and b wrong
    b_only: int
    p_value: float
    diff_low: float  # paired bootstrap interval of top1_b - top1_a
    diff_high: float
    min_detectable: float

    @property
    def top1_a(self) -> float:
        return 100.0 * self.correct_a / self.n

    @property
    def top1_b(self) -> float:
        return 100.0 * self.correct_b / self.n

    @property
    def diff(self) -> float:
        """top1_b - top1_a, in points."""
        return self.top1_b - self.top1_a

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def compare(correct_a: np.ndarray, correct_b: np.ndarray) -> Comparison:
    """Compare two per-image 0/1 outcome vectors of the same images, in the same order."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"not the same images: {a.shape} vs {b.shape}")
    n = len(a)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    low, high = paired_bootstrap(a, b)
    return Comparison(n=n, correct_a=int(a.sum()), correct_b=int(b.sum()), a_only=a_only, b_only=b_only,
                      p_value=mcnemar_exact(a_only, b_only), diff_low=low, diff_high=high,
                      min_detectable=min_detectable(n, a_only + b_only))
