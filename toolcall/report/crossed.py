"""The crossed items x seeds analysis: a paired difference when every seed's model answers the same items.

Each trained variant runs once per seed, and every run answers the same
test items, so items and seeds are crossed: ``compare_seeds`` judges the
mean difference over both with a two-way random-effects analysis
(``crossed_difference``), t with Satterthwaite's degrees of freedom
(``crossed_tests``), and returns the same ``Comparison`` and verdict as one
paired table (``toolcall.report.paired``), which is what one seed reduces to.
Student's t is computed here (no SciPy: pandas and numpy are the pinned
stack).
"""

import dataclasses
import math
from statistics import NormalDist

import numpy as np

from toolcall.report.paired import compare_table, judged
from toolcall.stats import paired_table

_NORMAL = NormalDist()


def _continued_fraction(a, b, x):
    """The continued fraction of the incomplete beta function (Numerical Recipes 6.4, modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_regularized(a, b, x):
    """I_x(a, b), the regularized incomplete beta function, for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):  # where the fraction converges fast; else by symmetry
        return front * _continued_fraction(a, b, x) / a
    return 1.0 - front * _continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom; inf: normal."""
    if math.isinf(df):
        return _NORMAL.cdf(t)
    tail = 0.5 * _beta_regularized(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p, df):
    """The t with ``t_cdf(t, df) = p``, by bisection (no SciPy here: pandas and numpy are the pinned stack)."""
    if math.isinf(df):
        return _NORMAL.inv_cdf(p)
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclasses.dataclass(frozen=True)
class Crossed:
    """The mean paired difference over items x seeds, its variance and Satterthwaite degrees of freedom."""

    delta: float
    variance: float
    df: float
    items: int
    seeds: int


def crossed_difference(before, after):
    """Mean difference ``after - before`` over an items x seeds design, items and seeds both random.

    Why this and not a bootstrap or pooled tables: every seed's model answers
    the same items, so items and seeds are crossed, and the mean difference D
    over n items and S seeds has variance sigma_item^2 / n + sigma_seed^2 / S +
    sigma_res^2 / (n S) (two-way random effects, no replication). The two-way
    ANOVA mean squares of the differences d[i, s] estimate it: with
    E[MS_item] = sigma_res^2 + S sigma_item^2, E[MS_seed] = sigma_res^2 + n sigma_seed^2
    and E[MS_res] = sigma_res^2,
    Var(D) = (MS_res + [MS_item - MS_res]+ + [MS_seed - MS_res]+) / (n S),
    a component estimated below 0 taken as 0. Its degrees of freedom are
    Satterthwaite's, (sum c_k MS_k)^2 / sum (c_k MS_k)^2 / df_k, which fall
    towards S - 1 when the seeds disagree: with 3 seeds the interval then
    uses t with ~2 df, as wide as 3 seeds warrant. A bootstrap over 3 seeds
    has only 10 distinct resamples and understates the seed variance by
    (S - 1) / S; Newcombe on tables pooled over seeds would count an item
    S times as if it were S independent items. Like any variance-based
    interval it is a point when no item changes under any seed.

    ``before`` / ``after``: items x seeds arrays of 0/1 correctness (rows the
    same items, columns the same seeds; a variant with no seed, the base
    model, repeats its one column). Needs n >= 2 and S >= 2.
    """
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2:
        raise ValueError(f"a crossed comparison needs >= 2 items and >= 2 seeds, got shape {d.shape}")
    n, seeds = d.shape
    grand, by_item, by_seed = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_item = seeds * float(((by_item - grand) ** 2).sum()) / (n - 1)
    ms_seed = n * float(((by_seed - grand) ** 2).sum()) / (seeds - 1)
    residual = d - by_item[:, None] - by_seed[None, :] + grand
    ms_res = float((residual**2).sum()) / ((n - 1) * (seeds - 1))
    kept = [(ms, df) for ms, df in ((ms_item, n - 1), (ms_seed, seeds - 1)) if ms > ms_res]
    terms = kept + [(ms_res * (1 - len(kept)), (n - 1) * (seeds - 1))]  # c_res = 1 - (components kept)
    total = sum(t for t, _ in terms)
    spread = sum(t * t / df for t, df in terms if t)
    df = total * total / spread if spread > 0 else math.inf
    return Crossed(delta=float(grand), variance=max(0.0, total) / (n * seeds), df=df, items=n, seeds=seeds)


def _t_p(z, df):
    """P(T > z): a one-sided p-value; z may be +-inf (a zero-variance difference)."""
    if math.isinf(z):
        return 0.0 if z > 0 else 1.0
    return 1.0 - t_cdf(z, df)


def crossed_tests(c, margin, alpha, power):
    """``(ci, ci_equivalence, p_value, p_equivalence, mde)`` of a ``Crossed`` difference, t with its df.

    Equivalence: both one-sided t-tests at the margins (TOST), so p_equivalence
    < alpha exactly when the 1 - 2 alpha interval lies inside (-margin,
    +margin), as for one table. MDE: the difference a two-sided alpha test
    detects with ``power`` at this standard error, (t_{1-alpha/2} + t_power) se,
    but no smaller than k^2 / (n + k^2): the difference delta itself, moving
    a delta share of the items in every seed, would come with
    se = sqrt(delta (1 - delta) / n) even where the observed se is smaller (few
    items changed); k^2 / (n + k^2) solves delta = k se there (the analogue of
    Connor's psi >= delta floor in ``paired.minimum_detectable_difference``).
    """
    se = math.sqrt(c.variance)

    def z(bound):
        if se > 0:
            return (c.delta - bound) / se
        return 0.0 if c.delta == bound else math.copysign(math.inf, c.delta - bound)

    def interval(confidence):
        half = t_quantile(0.5 + confidence / 2, c.df) * se
        return max(-1.0, c.delta - half), min(1.0, c.delta + half)

    p_value = min(1.0, 2 * _t_p(abs(z(0.0)), c.df))
    p_equivalence = max(_t_p(z(-margin), c.df), _t_p(-z(margin), c.df))
    k = t_quantile(1 - alpha / 2, c.df) + t_quantile(power, c.df)
    mde = max(k * se, k * k / (c.items + k * k))
    return interval(1 - alpha), interval(1 - 2 * alpha), p_value, p_equivalence, (mde if mde <= 1 else math.inf)


def compare_seeds(before, after, margin, alpha, power):
    """The ``Comparison`` of two items x seeds correctness arrays (see ``crossed_difference``).

    One seed (one column) is the single-table case, judged by Newcombe's
    interval and the exact McNemar test; with several the crossed analysis.
    """
    before, after = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"before {before.shape} and after {after.shape} must be the same items x seeds")
    tables = [paired_table(dict(enumerate(b.tolist())), dict(enumerate(a.tolist()))) for b, a in zip(before.T, after.T)]
    if len(tables) == 1:
        return compare_table(tables[0], margin, alpha, power)
    c = crossed_difference(before, after)
    return judged(tables, c.delta, *crossed_tests(c, margin, alpha, power), margin)
