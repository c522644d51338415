"""The crossed items x seeds analysis: a paired difference when every seed's model answers the same items.

Each trained variant runs once per seed, and every run answers the same
test items, so items and seeds are crossed: ``compare_seeds`` judges the
mean difference over both with a two-way random-effects analysis
(``crossed_difference``), t with Satterthwaite's degrees of freedom
(``crossed_tests``), and returns the same ``Comparison`` and verdict as one
paired table (``toolcall.report.paired``), which is what one seed reduces to.
Student's t is ``scipy.stats.t`` (fractional df; df = inf is the normal).
No library estimates this design in closed form with Satterthwaite's df, so
the ANOVA estimator is ours; tests/test_crossed.py checks it against
statsmodels' REML ``MixedLM`` and by simulation.
"""

import dataclasses
import math

import numpy as np
from scipy.stats import t as student_t

from toolcall.report.paired import compare_table, judged
from toolcall.stats import paired_table


@dataclasses.dataclass(frozen=True)
class Crossed:
    """The mean paired difference over items x seeds, its variance and Satterthwaite degrees of freedom."""

    delta: float
    variance: float
    df: float
    items: int
    seeds: int


def _differences(before, after):
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2:
        raise ValueError(f"a crossed comparison needs >= 2 items and >= 2 seeds, got shape {d.shape}")
    return d


def _mean_squares(d):
    """``(MS_item, MS_seed, MS_res)``: the two-way ANOVA mean squares (no replication) of an items x seeds array."""
    n, seeds = d.shape
    grand, by_item, by_seed = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_item = seeds * float(((by_item - grand) ** 2).sum()) / (n - 1)
    ms_seed = n * float(((by_seed - grand) ** 2).sum()) / (seeds - 1)
    residual = d - by_item[:, None] - by_seed[None, :] + grand
    return ms_item, ms_seed, float((residual**2).sum()) / ((n - 1) * (seeds - 1))


def variance_components(before, after):
    """``(sigma_item^2, sigma_seed^2, sigma_res^2)`` of the differences ``after - before``: ANOVA estimators.

    The method-of-moments (Henderson method 1) estimates of the two-way
    crossed random-effects model without replication, read off the
    expected mean squares (see ``crossed_difference``):
    sigma_item^2 = (MS_item - MS_res) / S, sigma_seed^2 = (MS_seed - MS_res) / n,
    sigma_res^2 = MS_res. Not truncated at 0 here. In a balanced design they
    equal the REML estimates whenever those are inside the parameter space
    (Searle, Casella & McCulloch 1992, Variance Components, ch. 6), which
    is how tests/test_crossed.py checks them against statsmodels' MixedLM.
    """
    d = _differences(before, after)
    n, seeds = d.shape
    ms_item, ms_seed, ms_res = _mean_squares(d)
    return (ms_item - ms_res) / seeds, (ms_seed - ms_res) / n, ms_res


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
    d = _differences(before, after)
    n, seeds = d.shape
    variance, df = variance_df(*_mean_squares(d), n, seeds)
    return Crossed(delta=float(d.mean()), variance=variance, df=df, items=n, seeds=seeds)


def variance_df(ms_item, ms_seed, ms_res, n, seeds):
    """``(Var(D), Satterthwaite df)`` of the mean difference from the mean squares of an n x S design.

    Shared by ``crossed_difference`` (observed mean squares) and
    ``toolcall.report.power`` (mean squares projected to another design).
    """
    kept = [(ms, df) for ms, df in ((ms_item, n - 1), (ms_seed, seeds - 1)) if ms > ms_res]
    terms = kept + [(ms_res * (1 - len(kept)), (n - 1) * (seeds - 1))]  # c_res = 1 - (components kept)
    total = sum(t for t, _ in terms)
    spread = sum(t * t / df for t, df in terms if t)
    df = total * total / spread if spread > 0 else math.inf
    return max(0.0, total) / (n * seeds), df


def _t_p(z, df):
    """P(T > z) for Student's t with ``df``: ``scipy.stats.t.sf``; z may be +-inf (a zero-variance difference)."""
    if math.isinf(z):
        return 0.0 if z > 0 else 1.0
    return float(student_t.sf(z, df))


def _t_quantile(p, df):
    """The p quantile of Student's t with ``df`` (fractional or inf): ``scipy.stats.t.ppf``."""
    return float(student_t.ppf(p, df))


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
        half = _t_quantile(0.5 + confidence / 2, c.df) * se
        return max(-1.0, c.delta - half), min(1.0, c.delta + half)

    p_value = min(1.0, 2 * _t_p(abs(z(0.0)), c.df))
    p_equivalence = max(_t_p(z(-margin), c.df), _t_p(-z(margin), c.df))
    mde = minimum_detectable(c.variance, c.df, c.items, alpha, power)
    return interval(1 - alpha), interval(1 - 2 * alpha), p_value, p_equivalence, mde


def minimum_detectable(variance, df, items, alpha, power):
    """The MDE of ``crossed_tests``: max((t_{1-alpha/2,df} + t_{power,df}) se, k^2 / (n + k^2)); > 1: inf."""
    k = _t_quantile(1 - alpha / 2, df) + _t_quantile(power, df)
    mde = max(k * math.sqrt(variance), k * k / (items + k * k))
    return mde if mde <= 1 else math.inf


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
