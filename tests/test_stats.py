"""The paired statistics against published and hand-computed cases (toolcall/stats.py, toolcall/report/paired.py,
toolcall/report/crossed.py).

One run per variant: Newcombe's interval, McNemar, TOST, Connor's MDE, Holm. Several seeds: the crossed
items x seeds analysis (t with Satterthwaite's df), checked against hand-worked designs.

Tables are ``(both, only_base, only_other, neither)``; differences are
accuracy(other) - accuracy(base). In Newcombe's (1998) notation e, f, g, h
with difference (f - g)/n, that is ``(e, g, f, h)``.
"""

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest
from scipy.stats import t as student_t

from toolcall.report.crossed import Crossed, compare_seeds, crossed_difference, crossed_tests
from toolcall.report.paired import (adjusted_verdict, compare, compare_table, family_holm, holm, mcnemar_exact,
                                    minimum_detectable_difference, newcombe_interval, newcombe_phi, one_sided_p,
                                    tost_p, verdict)
from toolcall.stats import paired_table, record_table, table_record, wilson

Z95 = 1.959963984540054  # NormalDist().inv_cdf(0.975)
Z80 = 0.8416212335729143  # NormalDist().inv_cdf(0.8)


# Newcombe (1998), Statistics in Medicine 17:2635-2650, Table II, method 10 (4 decimals as published;
# the same four cases are the examples of the R package propint's ci.two.dep.props).
@pytest.mark.parametrize("e, f, g, h, lower, upper", [
    (36, 12, 2, 0, 0.0569, 0.3404),
    (18, 12, 2, 18, 0.0562, 0.3290),
    (53, 0, 0, 1, -0.0729, 0.0729),  # no discordant pair: the interval does not collapse to 0
    (0, 30, 0, 0, 0.8395, 1.0),  # every pair discordant one way: capped at 1
])
def test_newcombe_method_10_reproduces_the_published_intervals(e, f, g, h, lower, upper):
    lo, hi = newcombe_interval((e, g, f, h), 0.95)
    assert (round(lo, 4), round(hi, 4)) == (lower, upper)


def test_newcombe_interval_by_hand():
    """(e, f, g, h) = (18, 12, 2, 18), n = 50, written out.

    p_other = (18 + 12)/50 = 0.6, p_base = (18 + 2)/50 = 0.4, d = 0.2.
    Wilson, z = 1.959964, z^2 = 3.841459: for 30/50
      centre = (0.6 + 3.841459/100) / (1 + 3.841459/50) = 0.638415 / 1.076829 = 0.592865
      half   = 1.959964 sqrt(0.6*0.4/50 + 3.841459/10000) / 1.076829
             = 1.959964 * 0.072001 / 1.076829 = 0.131051
      -> (0.461814, 0.723916); 20/50 mirrors it: (0.276084, 0.538186).
    phi: e h - f g = 324 - 24 = 300 > n/2 = 25, so 300 - 25 = 275 over sqrt(30*20*20*30) = 600: 0.458333.
    The lower limit combines 0.6 - 0.461814 = 0.138186 (other's lower side) with 0.538186 - 0.4 =
    0.138186 (base's upper side); the upper limit 0.723916 - 0.6 = 0.123916 with 0.4 - 0.276084 = 0.123916:
      down = 0.138186 sqrt(2 - 2*0.458333) = 0.138186 * 1.040833 = 0.143828 -> lower 0.2 - 0.143828 = 0.056172;
      up   = 0.123916 * 1.040833 = 0.128976 -> upper 0.2 + 0.128976 = 0.328976.
    """
    lo_other, hi_other = wilson(30, 50, Z95)
    assert lo_other == pytest.approx(0.461814, abs=1e-6) and hi_other == pytest.approx(0.723916, abs=1e-6)
    assert newcombe_phi((18, 2, 12, 18)) == pytest.approx(275 / 600)
    lo, hi = newcombe_interval((18, 2, 12, 18), 0.95)
    assert lo == pytest.approx(0.056172, abs=2e-6) and hi == pytest.approx(0.328976, abs=2e-6)


@pytest.mark.parametrize("table, phi", [
    ((18, 2, 12, 18), 275 / 600),  # positive cross product: shrunk by n/2
    ((5, 4, 4, 5), 0.0),  # 25 - 16 = 9 <= n/2 = 9: shrunk to 0
    ((0, 5, 5, 0), -1.0),  # negative: kept, -25 / sqrt(5*5*5*5)
    ((7, 0, 3, 0), 0.0),  # an empty margin (other gets every item right): 0
])
def test_newcombe_phi_continuity_correction(table, phi):
    assert newcombe_phi(table) == pytest.approx(phi)


def test_all_correct_and_all_wrong_give_a_symmetric_interval_of_known_width():
    # p = 1 on both sides, phi = 0 (empty margins): the interval is +/- (1 - Wilson lower of n/n)
    # = +/- z^2 / (n + z^2) = 3.841459 / 203.841459 = 0.018845 for n = 200.
    width = Z95**2 / (200 + Z95**2)
    assert width == pytest.approx(0.018845, abs=1e-6)
    for table in ((200, 0, 0, 0), (0, 0, 0, 200)):
        lo, hi = newcombe_interval(table)
        assert lo == pytest.approx(-width) and hi == pytest.approx(width)


def test_swapping_the_variants_negates_the_interval():
    lo, hi = newcombe_interval((47, 5, 11, 137))
    assert newcombe_interval((47, 11, 5, 137)) == (pytest.approx(-hi), pytest.approx(-lo))


def test_no_items_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="no paired items"):
        newcombe_interval((0, 0, 0, 0))
    with pytest.raises(ValueError, match="no paired items"):
        compare({"a": True}, {"b": True}, 0.05, 0.05, 0.8)  # no shared id
    with pytest.raises(ValueError, match="negative"):
        newcombe_interval((3, -1, 2, 0))


def test_paired_table_counts_shared_ids_only():
    base = {"a": True, "b": True, "c": False, "d": False, "x": True}
    other = {"a": True, "b": False, "c": True, "d": False, "y": False}
    assert paired_table(base, other) == (1, 1, 1, 1)
    c = compare(base, other, 0.05, 0.05, 0.8)
    assert (c.n, c.only_base, c.only_other, c.delta) == (4, 1, 1, 0.0)


def test_a_stored_table_record_names_its_arms_and_reads_back():
    before = {"a": True, "b": True, "c": False, "d": False, "e": False}
    after = {"a": True, "b": False, "c": True, "d": True, "e": False}
    record = table_record(before, after, "greedy", "best_of_n")
    assert record == {"before": "greedy", "after": "best_of_n", "both_correct": 1, "only_before": 1,
                      "only_after": 2, "both_wrong": 1}
    assert record_table(record) == paired_table(before, after) == (1, 1, 2, 1)


def test_the_exact_mcnemar_p_is_kept():
    # b = 4, c = 1: 2 * P(Binomial(5, 1/2) <= 1) = 2 * (1 + 5) / 32 = 0.375.
    assert mcnemar_exact(4, 1) == 0.375
    assert compare_table((18, 4, 1, 37), 0.05, 0.05, 0.8).p_value == 0.375


# Each of the four verdicts from a constructed table (margin 5 points, alpha 0.05).
@pytest.mark.parametrize("table, word, within", [
    ((0, 0, 52, 148), "better", False),  # 95% CI [+20.1, +32.5]
    ((0, 52, 0, 148), "worse", False),  # the mirror image
    ((51, 1, 2, 146), "equivalent", True),  # 95% CI [-1.6, +2.7]; 90% CI [-1.2, +2.3] inside +/-5
    ((47, 5, 11, 137), "inconclusive", False),  # 95% CI [-1.1, +7.1] holds 0; 90% CI reaches +6.4
    ((4000, 100, 300, 5600), "better", True),  # +2.0 [+1.6, +2.4] on 10,000 items: real, but inside the margin
    ((0, 0, 1, 49), "inconclusive", False),  # +2.0 on 50 items: too few to tell
])
def test_four_way_verdicts(table, word, within):
    c = compare_table(table, 0.05, 0.05, 0.8)
    assert (c.verdict, c.within_margin) == (word, within)


def test_verdict_rule_at_its_edges():
    assert verdict((0.0, 0.1), (0.01, 0.09), 0.05) == ("inconclusive", False)  # 0 on the edge is not excluded
    assert verdict((0.001, 0.1), (0.01, 0.09), 0.05) == ("better", False)
    assert verdict((-0.04, 0.03), (-0.03, 0.05), 0.05) == ("inconclusive", False)  # at +margin: not inside
    assert verdict((-0.04, 0.03), (-0.03, 0.0499), 0.05) == ("equivalent", True)
    assert verdict((-0.04, -0.001), (-0.03, -0.01), 0.05) == ("worse", True)


def _small_tables(n, step):
    for both, only_base, only_other in itertools.product(range(0, n + 1, step), repeat=3):
        if both + only_base + only_other <= n:
            yield both, only_base, only_other, n - both - only_base - only_other


@pytest.mark.parametrize("margin", [0.1, 0.2])
def test_tost_agrees_with_the_90_percent_interval(margin):
    """Both one-sided tests at 0.05 reject exactly when the 90% interval lies inside (-margin, +margin)."""
    outcomes = set()
    for table in _small_tables(40, 3):
        lo, hi = newcombe_interval(table, 0.90)
        inside = -margin < lo and hi < margin
        assert (tost_p(table, margin) < 0.05) == inside, table
        outcomes.add(inside)
    assert outcomes == {True, False}  # the grid reaches both decisions


def test_one_sided_p_inverts_the_interval():
    table = (47, 5, 11, 137)  # +3.0 points
    # H0: diff <= 0 is rejected at 0.025 exactly when the 95% interval's lower limit is above 0 (it is not).
    p = one_sided_p(table, 0.0, above=True)
    assert 0.025 < p < 0.5
    lo, _ = newcombe_interval(table, 1 - 2 * p)  # the interval whose lower limit is 0
    assert lo == pytest.approx(0.0, abs=1e-9)
    # The two one-sided p-values at the same bound sum to 1; at the estimate each is 1/2.
    assert one_sided_p(table, 0.0, above=False) == pytest.approx(1 - p)
    assert one_sided_p(table, 0.03, above=True) == 0.5


def test_minimum_detectable_difference_by_hand():
    """n = 200 pairs, 16 discordant (psi = 0.08), alpha 0.05 two-sided, power 0.8.

    z_a = 1.959964, z_b = 0.841621; sqrt(200) = 14.142136.
    k = (14.142136 * 1.959964 + 0.841621 sqrt(200 - 3.841459 + 0.708326)) / (200 + 0.708326)
      = (27.718076 + 0.841621 * 14.030925) / 200.708326 = (27.718076 + 11.808725) / 200.708326 = 0.196937
    MDE = k sqrt(0.08) = 0.196937 * 0.282843 = 0.055702 (5.6 points).
    With 3 discordant (psi = 0.015 < k^2 = 0.038784) a difference that large needs more discordant
    items than were seen, so psi = diff: MDE = k^2 = 0.038784, the floor at n = 200.
    """
    assert minimum_detectable_difference(200, 16) == pytest.approx(0.055702, abs=1e-6)
    assert minimum_detectable_difference(200, 3) == pytest.approx(0.038784, abs=1e-6)
    assert minimum_detectable_difference(200, 0) == minimum_detectable_difference(200, 7)  # both at the floor


def test_minimum_detectable_difference_solves_connors_power_equation():
    # Power of McNemar's test at diff (Connor 1987): Phi((sqrt(n) diff - z_a sqrt(psi)) / sqrt(psi - diff^2)).
    n, psi = 200, 0.3
    diff = minimum_detectable_difference(n, round(psi * n))
    power = NormalDist().cdf((math.sqrt(n) * diff - Z95 * math.sqrt(psi)) / math.sqrt(psi - diff**2))
    assert power == pytest.approx(0.8, abs=1e-9)
    assert minimum_detectable_difference(800, 240) == pytest.approx(diff / 2, rel=0.01)  # 4x the items: half


def test_minimum_detectable_difference_with_too_few_items():
    assert minimum_detectable_difference(3, 3) == math.inf  # n - z_a^2 + z_b^2 < 0: nothing detectable
    assert minimum_detectable_difference(5, 5) < 1
    with pytest.raises(ValueError):
        minimum_detectable_difference(0, 0)


def test_holm_by_hand():
    # Sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to 0.06
    # to stay monotone); back in the input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.2]) == [0.2] and holm([]) == []


# ---------------------------------------------------------------- several seeds: items x seeds crossed


t_cdf, t_quantile = student_t.cdf, student_t.ppf  # the reports' t (toolcall/report/crossed.py) is scipy.stats.t


# Student's t quantiles as printed in standard tables (e.g. Fisher & Yates; NIST e-Handbook 1.3.6.7.2):
# kept as a check of the library at the fractional and infinite df that Satterthwaite's approximation gives.
@pytest.mark.parametrize("p, df, t", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 5, 2.571), (0.975, 30, 2.042), (0.95, 10, 1.812),
    (0.8, 2, 1.061), (0.8, 10, 0.879), (0.025, 4, -2.776),
])
def test_t_quantiles_match_the_tables(p, df, t):
    assert t_quantile(p, df) == pytest.approx(t, abs=5e-4)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_tends_to_the_normal_and_takes_fractional_df():
    assert t_quantile(0.975, math.inf) == pytest.approx(Z95)
    assert t_quantile(0.975, 1e6) == pytest.approx(Z95, abs=1e-5)
    assert t_quantile(0.975, 3) < t_quantile(0.975, 2.5) < t_quantile(0.975, 2)  # Satterthwaite df are fractional
    # df = 2 has a closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    assert t_cdf(1.5, 2) == pytest.approx(0.5 + 1.5 / (2 * math.sqrt(2 + 1.5**2)))


def test_crossed_difference_by_hand():
    """4 items x 3 seeds, base all wrong, so d = after:

        item 1: 1 1 1   (mean 1)        seed means: 3/4, 2/4, 1/4; grand mean D = 6/12 = 0.5
        item 2: 1 1 0   (mean 2/3)
        item 3: 0 0 0   (mean 0)
        item 4: 1 0 0   (mean 1/3)

    MS_item = S sum (item mean - D)^2 / (n - 1) = 3 (1/4 + 1/36 + 1/4 + 1/36) / 3 = 5/9
    MS_seed = n sum (seed mean - D)^2 / (S - 1) = 4 (1/16 + 0 + 1/16) / 2 = 1/4
    residuals d - item mean - seed mean + D, squared and summed: 1/8 + 42/144 + 1/8 + 42/144 = 5/6,
    MS_res = (5/6) / ((n - 1)(S - 1)) = (5/6) / 6 = 5/36.
    Both components are positive: Var(D) = (MS_item + MS_seed - MS_res) / (n S) = (20 + 9 - 5)/36 / 12 = 1/18.
    Satterthwaite: df = (2/3)^2 / ((5/9)^2/3 + (1/4)^2/2 + (5/36)^2/6) = (4/9) / (1068/7776) = 2592/801 = 3.236.
    """
    after = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=bool)
    c = crossed_difference(np.zeros_like(after), after)
    assert (c.delta, c.items, c.seeds) == (0.5, 4, 3)
    assert c.variance == pytest.approx(1 / 18) and c.df == pytest.approx(2592 / 801)
    cmp = compare_seeds(np.zeros_like(after), after, 0.05, 0.05, 0.8)
    half = t_quantile(0.975, 2592 / 801) * math.sqrt(1 / 18)
    assert cmp.ci == (pytest.approx(0.5 - half), 1.0)  # capped at 1
    assert cmp.seeds == 3 and cmp.n == 4 and cmp.tables == ((0, 0, 3, 1), (0, 0, 2, 2), (0, 0, 1, 3))


def test_crossed_difference_drops_a_component_estimated_below_zero():
    """4 items x 2 seeds: d = (1 1), (1 0), (0 0), (0 1). Seed means 1/2, 1/2 = D: MS_seed = 0.

    Item means 1, 1/2, 0, 1/2: MS_item = 2 (1/4 + 0 + 1/4 + 0) / 3 = 1/3; residuals 0 0 / +-1/2 / 0 0 / -+1/2:
    MS_res = 1 / 3. Neither component exceeds MS_res, so Var(D) = MS_res / (n S) = 1/24 with df (n-1)(S-1) = 3.
    """
    after = np.array([[1, 1], [1, 0], [0, 0], [0, 1]], dtype=bool)
    c = crossed_difference(np.zeros_like(after), after)
    assert c.variance == pytest.approx(1 / 24) and c.df == pytest.approx(3)


def test_identical_seeds_reduce_to_the_paired_t_test_on_items():
    """Every seed the same run: no seed or residual variance, Var(D) = var(d_i) / n with n - 1 df."""
    d = np.array([1, 0, 0, 1, -1, 0, 1, 1, 0, 0])
    before, after = np.tile((d == -1)[:, None], 3), np.tile((d == 1)[:, None], 3)
    c = crossed_difference(before, after)
    assert c.delta == pytest.approx(0.3) and c.variance == pytest.approx(d.var(ddof=1) / 10) and c.df == 9
    cmp = compare_seeds(before, after, 0.05, 0.05, 0.8)
    t = 0.3 / math.sqrt(d.var(ddof=1) / 10)
    assert cmp.p_value == pytest.approx(2 * (1 - t_cdf(t, 9)))


def test_one_seed_is_the_single_table_case():
    rng = np.random.default_rng(1)
    before, after = rng.random((60, 1)) < 0.3, rng.random((60, 1)) < 0.5
    table = paired_table(dict(enumerate(before[:, 0])), dict(enumerate(after[:, 0])))
    assert compare_seeds(before, after, 0.05, 0.05, 0.8) == compare_table(table, 0.05, 0.05, 0.8)


def test_crossed_tost_agrees_with_the_90_percent_interval():
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(300):
        n, seeds = rng.integers(5, 60), rng.integers(2, 5)
        before = rng.random((n, seeds)) < rng.random()
        after = before ^ (rng.random((n, seeds)) < rng.random() * 0.4)
        c = compare_seeds(before, after, 0.1, 0.05, 0.8)
        inside = -0.1 < c.ci_equivalence[0] and c.ci_equivalence[1] < 0.1
        assert (c.p_equivalence < 0.05) == inside
        assert (c.p_value < 0.05) == (c.ci[0] > 0 or c.ci[1] < 0)  # the t-test and the interval agree too
        outcomes.add(inside)
    assert outcomes == {True, False}


def test_a_change_in_no_item_under_any_seed_is_a_point():
    same = np.random.default_rng(2).random((30, 3)) < 0.4
    c = compare_seeds(same, same, 0.05, 0.05, 0.8)
    assert (c.delta, c.ci, c.p_value, c.p_equivalence, c.verdict) == (0.0, (0.0, 0.0), 1.0, 0.0, "equivalent")


def test_crossed_minimum_detectable_difference_by_hand():
    """(t_{0.975, df} + t_{0.8, df}) se, but at least k^2 / (n + k^2) (a difference moves that share of items)."""
    after = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=bool)
    c = crossed_difference(np.zeros_like(after), after)
    k = t_quantile(0.975, c.df) + t_quantile(0.8, c.df)  # 2.98 + 1.04 at 3.24 df
    assert k * k / (4 + k * k) < k * math.sqrt(c.variance)  # the floor, 0.80, is below 0.95
    assert crossed_tests(c, 0.05, 0.05, 0.8)[4] == pytest.approx(k * math.sqrt(c.variance))
    assert crossed_tests(Crossed(0.0, 0.25**2, 3.0, 4, 3), 0.05, 0.05, 0.8)[4] == math.inf  # over 1: none
    wide = Crossed(delta=0.0, variance=0.02**2, df=math.inf, items=200, seeds=3)
    assert crossed_tests(wide, 0.05, 0.05, 0.8)[4] == pytest.approx((Z95 + Z80) * 0.02)  # 5.6 points
    tight = Crossed(delta=0.0, variance=0.001**2, df=math.inf, items=200, seeds=3)
    k = Z95 + Z80
    assert crossed_tests(tight, 0.05, 0.05, 0.8)[4] == pytest.approx(k * k / (200 + k * k))  # 3.8 points, the floor


def test_each_seed_is_paired_with_its_own_start():
    """The per-seed tables come from column s of both sides: seed 1's DPO against seed 1's SFT."""
    before = np.array([[1, 0], [0, 1], [0, 0]], dtype=bool)
    after = np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)
    c = compare_seeds(before, after, 0.05, 0.05, 0.8)
    assert c.tables == ((1, 0, 1, 1), (1, 0, 1, 1)) and c.table == (2, 0, 2, 2) and c.delta == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same items x seeds"):
        compare_seeds(before, after[:, :1], 0.05, 0.05, 0.8)


def test_family_holm_covers_both_tests_of_every_comparison_and_the_verdict_after_it():
    a = compare_table((0, 0, 13, 67), 0.05, 0.05, 0.8)  # better: p = 2 / 2^13
    b = compare_table((51, 1, 2, 146), 0.05, 0.05, 0.8)  # equivalent within 5 points
    (a_p, a_eq), (b_p, b_eq) = family_holm([a, b])
    # Sorted: b's TOST p 0.000184 (x4 = 0.000736), a's p 0.000244 (x3 = 0.000732, raised to 0.000736 to stay
    # monotone), a's TOST p 0.996 (x2, capped at 1), b's p 1.0.
    assert b_eq == pytest.approx(4 * b.p_equivalence) and a_p == b_eq and a_eq == b_p == 1.0
    assert holm([a.p_value, b.p_value, a.p_equivalence, b.p_equivalence]) == [a_p, b_p, a_eq, b_eq]
    assert adjusted_verdict(a, a_p, a_eq, 0.05) == "better"
    assert adjusted_verdict(b, b_p, b_eq, 0.05) == ("equivalent" if b_eq < 0.05 else "inconclusive")
    assert adjusted_verdict(b, 0.5, 0.049, 0.05) == "equivalent"
    assert adjusted_verdict(b, 0.5, 0.051, 0.05) == "inconclusive"
    assert adjusted_verdict(compare_table((0, 30, 0, 170), 0.05, 0.05, 0.8), 0.001, 1.0, 0.05) == "worse"
