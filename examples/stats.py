"""Per-query statistics for the benchmark: a paired, stratified bootstrap, and the choice-level fidelity to `full`.

Every method of a split is scored on the same queries, so methods are compared *paired*: one resample of the queries
is applied to every method at once, and a difference is the mean of per-query differences. Queries pooled from several
seeded splits are resampled within their split (`groups`), which keeps each split's share of the pool; `weights` make
the statistic a weighted mean (e.g. every task counts equally in a mean over tasks).

    >>> import numpy as np
    >>> result = paired_bootstrap({"a": np.ones(50), "b": np.zeros(50)}, contrasts=[("a", "b")], resamples=200)
    >>> result["diff"]["a-b"]["estimate"], result["diff"]["a-b"]["low"]
    (1.0, 1.0)
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def stratified_indices(groups: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`[resamples, n]` indices drawn with replacement within each group (each group keeps its size)."""
    n = len(groups)
    out = np.empty((resamples, n), dtype=np.int64)
    for value in np.unique(groups):
        members = np.flatnonzero(groups == value)
        out[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return out


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over the last axis, ignoring NaN entries (missing: a method that failed on a split)."""
    present = ~np.isnan(values)
    w = np.where(present, weights, 0.0)
    total = w.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (np.where(present, values, 0.0) * w).sum(axis=-1) / total, np.nan)


def _interval(point: float, samples: np.ndarray, level: float, n: int) -> dict:
    samples = samples[~np.isnan(samples)]
    if not samples.size or math.isnan(point):
        return {"estimate": None, "low": None, "high": None, "n": n}
    tail = (1 - level) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return {"estimate": float(point), "low": float(low), "high": float(high), "n": n}


def paired_bootstrap(values: Mapping[str, Sequence[float]], contrasts: Sequence[tuple[str, str]] = (), *,
                     gains: Sequence[tuple[str, str, str]] = (), groups: Sequence | None = None,
                     weights: Sequence[float] | None = None, gain_groups: Sequence | None = None,
                     resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals for the mean of each series and for paired differences of means.

    Args:
        values: name → per-query values `[n]`, all aligned on the same queries (NaN where a method has no score for a
            query). E.g. 1.0/0.0 for a correct/wrong answer.
        contrasts: pairs `(a, b)`; each gets the interval of `mean(a - b)` over the queries where both are present.
        gains: triples `(a, low, high)`; each gets the interval of the retained gain
            `(mean(a) - mean(low)) / (mean(high) - mean(low))` over the queries where all three are present; defined
            only where `high` beats `low` (NaN otherwise, in the estimate and in a resample).
        groups: `[n]` stratum of each query (its split); resampling keeps each stratum's size. Default: one stratum.
        weights: `[n]` weight of each query in the mean (default 1).
        gain_groups: `[n]` where given, each gain is computed within each of these groups (e.g. a task) and averaged
            over them, every group weighing the same (a mean of per-task retained gains); NaN where a group's gain is.
        resamples, seed, level: number of resamples, the generator's seed (same seed → same intervals), coverage.

    Returns:
        `{"mean": {name: {"estimate", "low", "high", "n"}}, "diff": {"a-b": {...}}, "gain": {a: {...}}}`; `n` counts
        the queries used.
    """
    names = list(values)
    series = {name: np.asarray(values[name], dtype=np.float64) for name in names}
    n = len(next(iter(series.values()))) if series else 0
    if any(len(v) != n for v in series.values()):
        raise ValueError("paired_bootstrap: every series must have one value per query (same length)")
    for a, b in [*contrasts, *((a, z) for a, z, _ in gains), *((a, f) for a, _, f in gains)]:
        if a not in series or b not in series:
            raise ValueError(f"paired_bootstrap: contrast {a!r} - {b!r} names a series that is not given")
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(groups) != n or len(weights) != n:
        raise ValueError("paired_bootstrap: groups and weights need one entry per query")
    rng = np.random.default_rng(seed)
    index = stratified_indices(groups, resamples, rng) if n else np.zeros((resamples, 0), dtype=np.int64)
    resampled_weights = weights[index]

    def summary(x: np.ndarray) -> dict:
        point = float(_weighted_mean(x, weights)) if n else float("nan")
        return _interval(point, _weighted_mean(x[index], resampled_weights), level, int((~np.isnan(x)).sum()))

    result = {"mean": {name: summary(series[name]) for name in names}, "diff": {}, "gain": {}}
    for a, b in contrasts:
        result["diff"][f"{a}-{b}"] = summary(series[a] - series[b])
    gain_parts = [np.ones(n, dtype=bool)] if gain_groups is None else \
        [np.asarray(gain_groups) == value for value in np.unique(np.asarray(gain_groups))]
    if any(len(part) != n for part in gain_parts):
        raise ValueError("paired_bootstrap: gain_groups needs one entry per query")

    def gain(x_a, x_low, x_high, w):
        def mean(x):
            return (np.where(w > 0, x, 0.0) * w).sum(axis=-1) / np.maximum(w.sum(axis=-1), 1e-300)
        with np.errstate(invalid="ignore", divide="ignore"):
            top, bottom = mean(x_a) - mean(x_low), mean(x_high) - mean(x_low)
            return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)

    for a, low, high in gains:
        present = ~(np.isnan(series[a]) | np.isnan(series[low]) | np.isnan(series[high]))
        # `w[index]`: the drawn queries' weights; a draw stays in its stratum (a split), which lies within one group (a
        # task), so every group keeps its size in every resample
        ws = [np.where(present & part, weights, 0.0) for part in gain_parts]
        point = float(np.mean([gain(series[a], series[low], series[high], w) for w in ws])) if present.any() \
            else float("nan")
        samples = np.mean([gain(series[a][index], series[low][index], series[high][index], w[index]) for w in ws],
                          axis=0)
        result["gain"][a] = _interval(point, np.atleast_1d(samples), level, int(present.sum()))
    return result


def log_softmax(scores: Sequence[float]) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    top = scores.max()
    return scores - top - np.log(np.exp(scores - top).sum())


def choice_js(p_scores: Sequence[float], q_scores: Sequence[float]) -> float:
    """Jensen-Shannon divergence (nats) between two choice distributions given as log-scores (renormalised), as the
    `emloc_fidelity` metric computes it per query."""
    log_p, log_q = log_softmax(p_scores), log_softmax(q_scores)
    log_m = np.logaddexp(log_p, log_q) - math.log(2.0)

    def kl(log_a):
        keep = np.isfinite(log_a)
        return float(np.sum(np.exp(log_a[keep]) * (log_a[keep] - log_m[keep])))

    return min(max(0.5 * kl(log_p) + 0.5 * kl(log_q), 0.0), math.log(2.0))


def top_choice(scores: Sequence[float]) -> int:
    """Index of the best choice (ties go to the first, like the fidelity metric and evaluate_memory)."""
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))
