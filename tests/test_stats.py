"""The paired statistics against published and hand-computed cases (toolcall/stats.py, toolcall/paired.py).

Tables are ``(both, only_base, only_other, neither)``; differences are
accuracy(other) - accuracy(base). In Newcombe's (1998) notation e, f, g, h
with difference (f - g)/n, that is ``(e, g, f, h)``.
"""

import itertools
import math
from statistics import NormalDist

import pytest

from toolcall.paired import (compare, compare_table, holm, minimum_detectable_difference, newcombe_interval,
                             newcombe_phi, one_sided_p, paired_table, tost_p, verdict)
from toolcall.stats import mcnemar_exact, wilson

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
