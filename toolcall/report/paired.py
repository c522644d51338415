"""Paired comparisons that can say "no effect": interval, four-way verdict, power, multiplicity.

Two variants scored on the same items make a paired 2x2 table ``(both,
only_base, only_other, neither)``: items both get right, only the first,
only the second, neither (``toolcall.stats.paired_table``; the ablation
stages store it as ``table_record``). The difference in accuracy is
``(only_other - only_base) / n``. Its interval is Newcombe's hybrid score
interval for paired data (method 10), the test of no difference is the
exact McNemar test, equivalence is TOST within a margin (read off the same
interval at twice the alpha), power is Connor's approximation for McNemar's
test, and a family of tests gets Holm's adjustment. Every p-value, interval
and verdict a report shows comes from here.

The standard pieces are library code: the normal distribution is
``scipy.stats.norm``, the Wilson intervals inside Newcombe's are
``statsmodels.stats.proportion.proportion_confint(method="wilson")``, the
exact McNemar test is ``statsmodels.stats.contingency_tables.mcnemar``,
Holm is ``statsmodels.stats.multitest.multipletests(method="holm")`` and
the interval is inverted with ``scipy.optimize.brentq``. What no library
has is written here: Newcombe's paired method 10 (statsmodels has Newcombe's
interval only for independent proportions, ``confint_proportions_2indep``),
the TOST built on it, and Connor's minimum detectable difference.

When each variant was trained once per seed (the main study), items and
seeds are crossed: ``toolcall.report.crossed`` judges the mean difference
over both and returns the same ``Comparison``.

Kept apart from ``stats`` (Wilson, paired tables), which the training, eval
and ablation stages import, so that changing how the reports judge a
difference does not make DVC retrain or re-evaluate: only the report stages
depend on this file.
"""

import dataclasses
import math

from scipy.optimize import brentq
from scipy.stats import norm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from toolcall.stats import paired_table

# The largest z the one-sided p-values search: norm.sf(37) = 5.7e-300 is still a normal double, so the
# z -> alpha -> z round trip through proportion_confint stays exact there.
_Z_MAX = 37.0


def z_two_sided(confidence):
    """The standard normal quantile of a two-sided interval at ``confidence`` (0.95 -> 1.96, 0.90 -> 1.645).

    ``scipy.stats.norm.ppf``.
    """
    return float(norm.ppf(0.5 + confidence / 2))


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value from the discordant counts (McNemar 1947, Psychometrika 12:153-157).

    ``b``: items right under A and wrong under B; ``c``: the reverse. Under the
    null each discordant item is a fair coin, so p = 2 P(Binomial(b+c, 1/2) <= min(b, c)),
    capped at 1: ``statsmodels.stats.contingency_tables.mcnemar(exact=True)``.
    """
    return float(mcnemar([[0, b], [c, 0]], exact=True).pvalue)


def _size(table):
    if min(table) < 0:
        raise ValueError(f"paired table {table} has a negative count")
    n = sum(table)
    if n == 0:
        raise ValueError("no paired items: a paired difference needs at least one item scored by both")
    return n


def table_delta(table):
    """accuracy(other) - accuracy(base) of a paired table: ``(only_other - only_base) / n``."""
    return (table[2] - table[1]) / _size(table)


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


def _wilson(k, n, alpha):
    """Wilson's (1927) score interval for k of n at two-sided ``alpha``, clipped to [0, 1] (statsmodels)."""
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return float(lo), float(hi)


def _newcombe(table, alpha):
    """Newcombe's method 10 interval at two-sided level ``alpha`` (see ``newcombe_interval``)."""
    both, only_base, only_other, _ = table
    n = _size(table)
    p_other, p_base = (both + only_other) / n, (both + only_base) / n
    lo_other, hi_other = _wilson(both + only_other, n, alpha)
    lo_base, hi_base = _wilson(both + only_base, n, alpha)
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
    changed, and it stays inside [-1, 1]. The Wilson intervals are
    statsmodels' ``proportion_confint(method="wilson")``; statsmodels has no
    paired Newcombe interval, so the combination is ours. Raises ValueError
    on an empty table.
    """
    return _newcombe(table, 1 - confidence)


def one_sided_p(table, bound, above):
    """p-value of H0: diff <= bound against diff > bound (``above``), or of diff >= bound against diff < bound.

    Obtained by inverting the Newcombe interval: the smallest alpha at which
    the one-sided 1 - alpha limit (the limit of the two-sided 1 - 2 alpha
    interval) excludes ``bound``: the root in z of limit(z) - bound, found by
    Brent's method (``scipy.optimize.brentq``), and p = ``norm.sf(z)``. So "p < alpha" is
    the same decision as "the 1 - 2 alpha interval excludes the bound", which
    makes TOST and the interval rule agree. When the estimate itself lies in
    H0 the p-value is 1 minus that of the opposite one-sided test (0.5 at the
    bound).
    """
    delta = table_delta(table)
    if delta == bound:
        return 0.5
    if (delta < bound) == above:
        return 1.0 - one_sided_p(table, bound, not above)

    def clearance(z):  # > 0 while the one-sided limit at z excludes the bound; decreasing in z
        lo, hi = _newcombe(table, 2 * norm.sf(z))
        return lo - bound if above else bound - hi

    # z = 0 is the point estimate itself, which excludes the bound
    if clearance(_Z_MAX) > 0:
        return float(norm.sf(_Z_MAX))
    return float(norm.sf(brentq(clearance, 0.0, _Z_MAX, xtol=1e-14, rtol=1e-15, maxiter=200)))


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
    z_a = z(1 - alpha/2), z_b = z(power) (``scipy.stats.norm.ppf``). Solved for diff:
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
    z_a, z_b = float(norm.ppf(1 - alpha / 2)), float(norm.ppf(power))
    slack = n - z_a**2 + z_b**2
    if slack < 0:
        return math.inf
    k = (math.sqrt(n) * z_a + z_b * math.sqrt(slack)) / (n + z_b**2)
    diff = k * math.sqrt(max(discordant / n, k * k))
    return diff if diff <= 1 else math.inf


def holm(p_values):
    """Holm's step-down adjusted p-values, in the input order (Holm 1979, Scand J Statist 6:65-70).

    The i-th smallest of m p-values is multiplied by m - i + 1 (i from 1),
    made non-decreasing along that order, and capped at 1; rejecting where
    the adjusted p < alpha keeps the chance of any false rejection in the
    family at most alpha. ``statsmodels.stats.multitest.multipletests(method="holm")``.
    """
    if not len(p_values):
        return []
    return [float(p) for p in multipletests(p_values, method="holm")[1]]


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
    table and the crossed items x seeds analysis for several (``crossed.compare_seeds``).
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


def judged(tables, delta, ci, ci_equivalence, p_value, p_equivalence, mde, margin):
    """The ``Comparison`` with these numbers and the verdict its two intervals give at ``margin``."""
    word, within = verdict(ci, ci_equivalence, margin)
    return Comparison(tables=tuple(tables), delta=delta, ci=ci, ci_equivalence=ci_equivalence, p_value=p_value,
                      p_equivalence=p_equivalence, mde=mde, verdict=word, within_margin=within)


def compare_table(table, margin, alpha, power):
    """The ``Comparison`` of a paired table; ``margin`` and the result in accuracy units (0.05 = 5 points)."""
    table = tuple(table)
    n = _size(table)
    return judged((table,), table_delta(table), newcombe_interval(table, 1 - alpha),
                  newcombe_interval(table, 1 - 2 * alpha), mcnemar_exact(table[1], table[2]), tost_p(table, margin),
                  minimum_detectable_difference(n, table[1] + table[2], alpha, power), margin)


def compare(base, other, margin, alpha, power):
    """The ``Comparison`` of two ``{id: correct}`` maps on the ids they share."""
    return compare_table(paired_table(base, other), margin, alpha, power)


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
