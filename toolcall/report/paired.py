"""Paired comparisons that can say "no effect": interval, four-way verdict, power, multiplicity.

Two variants scored on the same items make a paired 2x2 table ``(both,
only_base, only_other, neither)``: items both get right, only the first,
only the second, neither. The difference in accuracy is
``(only_other - only_base) / n``. Its interval is Newcombe's hybrid score
interval for paired data (method 10), equivalence is TOST within a margin
(read off the same interval at twice the alpha), power is Connor's
approximation for McNemar's test, and a family of tests gets Holm's
adjustment.

When each variant was trained once per seed (the main study), the same
items are answered by every seed's model: items and seeds are crossed, and
``compare_seeds`` judges the mean difference over both with a two-way
random-effects analysis (see ``crossed_difference``). With one seed it is
the single-table case above.

Kept apart from ``stats`` (Wilson, exact McNemar), which the training and
eval stages import, so that changing how the reports judge a
difference does not make DVC retrain or re-evaluate: only the report stages
depend on this file.
"""

import dataclasses
import math
from statistics import NormalDist

import numpy as np

from toolcall.stats import mcnemar_exact, wilson

_NORMAL = NormalDist()


def z_two_sided(confidence):
    """The standard normal quantile of a two-sided interval at ``confidence`` (0.95 -> 1.96, 0.90 -> 1.645)."""
    return _NORMAL.inv_cdf(0.5 + confidence / 2)


def paired_table(base, other):
    """``(both, only_base, only_other, neither)`` over the ids two ``{id: correct}`` maps share."""
    ids = set(base) & set(other)
    both = sum(1 for i in ids if base[i] and other[i])
    only_base = sum(1 for i in ids if base[i] and not other[i])
    only_other = sum(1 for i in ids if other[i] and not base[i])
    return both, only_base, only_other, len(ids) - both - only_base - only_other


def _size(table):
    if min(table) < 0:
        raise ValueError(f"paired table {table} has a negative count")
    n = sum(table)
    if n == 0:
        raise ValueError("no paired items: a paired difference needs at least one item scored by both")
    return n


def newcombe_phi(table):
    """Newcombe's continuity-corrected phi between the two variants' correctness.

    The correlation enters the interval because paired accuracies move
    together. As in Newcombe (1998), the numerator ``both*neither -
    only_base*only_other`` is shrunk by n/2 toward 0 when positive (0 if
    within n/2), kept when negative, and phi is 0 when any margin is empty.
    """
    both, only_base, only_other, neither = table
    n = _size(table)
    margins = (both + only_other) * (only_base + neither) * (both + only_base) * (only_other + neither)
    if margins == 0:
        return 0.0
    cross = both * neither - only_base * only_other
    if cross > n / 2:
        cross -= n / 2
    elif cross >= 0:
        cross = 0
    return cross / math.sqrt(margins)


def _newcombe(table, z):
    both, only_base, only_other, _ = table
    n = _size(table)
    p_other, p_base = (both + only_other) / n, (both + only_base) / n
    lo_other, hi_other = wilson(both + only_other, n, z)
    lo_base, hi_base = wilson(both + only_base, n, z)
    phi = newcombe_phi(table)
    d_lo_other, d_hi_other = p_other - lo_other, hi_other - p_other
    d_lo_base, d_hi_base = p_base - lo_base, hi_base - p_base
    # max(0, .): rounding can leave a tiny negative when phi is near 1 and the two distances match.
    down = math.sqrt(max(0.0, d_lo_other**2 - 2 * phi * d_lo_other * d_hi_base + d_hi_base**2))
    up = math.sqrt(max(0.0, d_hi_other**2 - 2 * phi * d_hi_other * d_lo_base + d_lo_base**2))
    delta = p_other - p_base
    return max(-1.0, delta - down), min(1.0, delta + up)


def newcombe_interval(table, confidence=0.95):
    """Interval for accuracy(other) - accuracy(base) from a paired table: Newcombe's method 10.

    Newcombe RG (1998), "Improved confidence intervals for the difference
    between binomial proportions based on paired data", Statistics in
    Medicine 17:2635-2650, method 10 (the hybrid score, "square-and-add"
    interval): take each variant's Wilson interval (l, u around p) and
    combine the distances on the sides that widen the difference, with the
    correlation ``newcombe_phi``:
    lower = d - sqrt((p_o - l_o)^2 - 2 phi (p_o - l_o)(u_b - p_b) + (u_b - p_b)^2),
    upper = d + sqrt((u_o - p_o)^2 - 2 phi (u_o - p_o)(p_b - l_b) + (p_b - l_b)^2).
    Unlike the Wald interval it does not collapse to a point when no item
    changed, and it stays inside [-1, 1]. Raises ValueError on an empty table.
    """
    return _newcombe(table, z_two_sided(confidence))


def one_sided_p(table, bound, above):
    """p-value of H0: diff <= bound against diff > bound (``above``), or of diff >= bound against diff < bound.

    Obtained by inverting the Newcombe interval: the smallest alpha at which
    the one-sided 1 - alpha limit (the limit of the two-sided 1 - 2 alpha
    interval) excludes ``bound``, found by bisection on z. So "p < alpha" is
    the same decision as "the 1 - 2 alpha interval excludes the bound", which
    makes TOST and the interval rule agree. When the estimate itself lies in
    H0 the p-value is 1 minus that of the opposite one-sided test (0.5 at the
    bound).
    """
    _, only_base, only_other, _ = table
    delta = (only_other - only_base) / _size(table)
    if delta == bound:
        return 0.5
    if (delta < bound) == above:
        return 1.0 - one_sided_p(table, bound, not above)

    def excludes(z):
        lo, hi = _newcombe(table, z)
        return lo > bound if above else hi < bound

    inside, outside = 0.0, 40.0  # z=0 is the point estimate itself, which excludes the bound
    if excludes(outside):
        return _NORMAL.cdf(-outside)
    for _ in range(80):
        mid = (inside + outside) / 2
        inside, outside = (mid, outside) if excludes(mid) else (inside, mid)
    return _NORMAL.cdf(-inside)


def tost_p(table, margin):
    """TOST p-value for equivalence within +/- ``margin`` (Schuirmann 1987): the larger of the two one-sided p's.

    H0: |diff| >= margin. Rejected at alpha exactly when the 1 - 2 alpha
    Newcombe interval lies inside (-margin, +margin) (see ``one_sided_p``).
    """
    return max(one_sided_p(table, -margin, above=True), one_sided_p(table, margin, above=False))


def minimum_detectable_difference(n, discordant, alpha=0.05, power=0.8):
    """Smallest |diff| a paired comparison of ``n`` items detects with ``power`` (two-sided ``alpha``).

    Connor RJ (1987), "Sample size for testing differences in proportions
    for the paired-sample design", Biometrics 43:207-211: McNemar's test on n
    pairs with discordance rate psi detects diff when
    sqrt(n) diff = z_a sqrt(psi) + z_b sqrt(psi - diff^2),
    z_a = z(1 - alpha/2), z_b = z(power). Solved for diff:
    diff = sqrt(psi) k, k = (sqrt(n) z_a + z_b sqrt(n - z_a^2 + z_b^2)) / (n + z_b^2).
    psi is the observed ``discordant / n``, but a difference needs at least
    as many discordant items as it moves (psi >= diff), so psi is raised to
    diff where the observed rate is lower: then diff = k^2, the floor for
    this n. Returns inf when n is too small for any difference up to 1 to
    be detectable. An approximation for planning: the verdicts come from
    the Newcombe interval, not from this test.
    """
    if n < 1 or not 0 <= discordant <= n:
        raise ValueError(f"need 0 <= discordant <= n and n >= 1, got discordant={discordant}, n={n}")
    z_a, z_b = _NORMAL.inv_cdf(1 - alpha / 2), _NORMAL.inv_cdf(power)
    slack = n - z_a**2 + z_b**2
    if slack < 0:
        return math.inf
    k = (math.sqrt(n) * z_a + z_b * math.sqrt(slack)) / (n + z_b**2)
    diff = k * math.sqrt(max(discordant / n, k * k))
    return diff if diff <= 1 else math.inf


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
    Connor's psi >= delta floor above).
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


def holm(p_values):
    """Holm's step-down adjusted p-values, in the input order (Holm 1979, Scand J Statist 6:65-70).

    The i-th smallest of m p-values is multiplied by m - i + 1 (i from 1),
    made non-decreasing along that order, and capped at 1; rejecting where
    the adjusted p < alpha keeps the chance of any false rejection in the
    family at most alpha.
    """
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(ci, ci_equivalence, margin):
    """``(word, within_margin)``: the four-way verdict from the two intervals of a difference.

    - ``better``: the 1 - alpha interval lies above 0; ``worse``: below 0;
    - ``equivalent``: neither, and the 1 - 2 alpha interval lies inside
      (-margin, +margin) (TOST at alpha);
    - ``inconclusive``: neither a difference nor equivalence is shown.
    A difference comes first: an interval that excludes 0 *and* sits within
    the margin is ``better``/``worse`` with ``within_margin`` True (real,
    but smaller than the margin calls relevant).
    """
    lo, hi = ci
    within = -margin < ci_equivalence[0] and ci_equivalence[1] < margin
    if lo > 0:
        return "better", within
    if hi < 0:
        return "worse", within
    return ("equivalent" if within else "inconclusive"), within


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One paired comparison, other against base, with everything the reports show.

    ``tables`` holds one paired table per seed (one table: a single run, or a
    variant with no seed against one); the interval is Newcombe's for one
    table and the crossed items x seeds analysis for several.
    """

    tables: tuple  # ((both, only_base, only_other, neither), ...), one per seed
    delta: float  # accuracy(other) - accuracy(base), averaged over the seeds
    ci: tuple  # 1 - alpha interval
    ci_equivalence: tuple  # 1 - 2 alpha interval (TOST)
    p_value: float  # of "no difference": exact McNemar (one table), crossed t-test (several)
    p_equivalence: float  # TOST
    mde: float  # minimum detectable |delta| at the configured power
    verdict: str
    within_margin: bool

    @property
    def table(self):
        """The tables summed over seeds: pairs (item, seed) in each cell."""
        return tuple(sum(t[k] for t in self.tables) for k in range(4))

    @property
    def seeds(self):
        return len(self.tables)

    @property
    def n(self):
        """Paired items (the same items under every seed)."""
        return sum(self.tables[0])

    @property
    def only_base(self):
        return self.table[1]

    @property
    def only_other(self):
        return self.table[2]


def compare_table(table, margin, alpha, power):
    """The ``Comparison`` of a paired table; ``margin`` and the result in accuracy units (0.05 = 5 points)."""
    table = tuple(table)
    n = _size(table)
    ci = newcombe_interval(table, 1 - alpha)
    ci_equivalence = newcombe_interval(table, 1 - 2 * alpha)
    word, within = verdict(ci, ci_equivalence, margin)
    return Comparison(tables=(table,), delta=(table[2] - table[1]) / n, ci=ci, ci_equivalence=ci_equivalence,
                      p_value=mcnemar_exact(table[1], table[2]), p_equivalence=tost_p(table, margin),
                      mde=minimum_detectable_difference(n, table[1] + table[2], alpha, power),
                      verdict=word, within_margin=within)


def compare(base, other, margin, alpha, power):
    """The ``Comparison`` of two ``{id: correct}`` maps on the ids they share."""
    return compare_table(paired_table(base, other), margin, alpha, power)


def compare_seeds(before, after, margin, alpha, power):
    """The ``Comparison`` of two items x seeds correctness arrays (see ``crossed_difference``).

    One seed (one column) is the single-table case, judged by Newcombe's
    interval and the exact McNemar test; with several the crossed analysis.
    """
    before, after = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"before {before.shape} and after {after.shape} must be the same items x seeds")
    tables = tuple((int((b & a).sum()), int((b & ~a).sum()), int((~b & a).sum()), int((~b & ~a).sum()))
                   for b, a in zip(before.T, after.T))
    if len(tables) == 1:
        return compare_table(tables[0], margin, alpha, power)
    c = crossed_difference(before, after)
    ci, ci_equivalence, p_value, p_equivalence, mde = crossed_tests(c, margin, alpha, power)
    word, within = verdict(ci, ci_equivalence, margin)
    return Comparison(tables=tables, delta=c.delta, ci=ci, ci_equivalence=ci_equivalence, p_value=p_value,
                      p_equivalence=p_equivalence, mde=mde, verdict=word, within_margin=within)


def family_holm(comparisons):
    """Holm over a family's 2m tests, each comparison's difference test and its equivalence test.

    A report asserts "better"/"worse" on the first and "equivalent" on the
    second, so both are claims the family-wise error must cover. Returns
    ``[(adjusted p_value, adjusted p_equivalence)]`` in the input order.
    """
    m = len(comparisons)
    adjusted = holm([c.p_value for c in comparisons] + [c.p_equivalence for c in comparisons])
    return list(zip(adjusted[:m], adjusted[m:]))


def adjusted_verdict(c, p_adjusted, p_equivalence_adjusted, alpha):
    """The four-way verdict from Holm-adjusted p-values: what survives the family's correction."""
    if p_adjusted < alpha:
        return "better" if c.delta > 0 else "worse"
    if p_equivalence_adjusted < alpha:
        return "equivalent"
    return "inconclusive"
