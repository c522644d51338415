"""The crossed items x seeds analysis (toolcall/report/crossed.py) against a library estimator and by simulation.

The ANOVA estimator and Satterthwaite's df are the one piece of the reports'
statistics that no library computes, so they are checked two ways:

(a) on simulated items x seeds differences, the variance components and the
    standard error of the mean difference agree with statsmodels' REML
    ``MixedLM`` fit of the same crossed random-effects model (one group,
    items and seeds as variance components): in a balanced design the two
    estimators coincide when the estimates are positive, so they differ only
    by the optimizer's tolerance (relative 2e-3 asserted; ~1e-4 observed);
(b) on 400 seeded replicates of the crossed Gaussian model with a known
    effect, the mean estimate recovers it and the 95% t interval with
    Satterthwaite's df covers it 95% of the time, within 3 binomial SDs.
"""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from toolcall.report.crossed import compare_seeds, crossed_difference, crossed_tests, variance_components


def _mixedlm(d):
    """statsmodels' REML fit of d[i, s] = mu + a_i + b_s + e: ``(mu, se(mu), sigma_item^2, sigma_seed^2, sigma^2)``."""
    n, seeds = d.shape
    frame = pd.DataFrame({"d": d.ravel(), "item": np.repeat(np.arange(n), seeds), "seed": np.tile(np.arange(seeds), n),
                          "group": 0})
    model = smf.mixedlm("d ~ 1", frame, groups="group", re_formula="0",
                        vc_formula={"item": "0 + C(item)", "seed": "0 + C(seed)"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter about the single group
        fit = model.fit(reml=True, method="lbfgs")
    assert fit.converged
    item, seed = fit.vcomp  # in the order of the sorted vc_formula keys: item, seed
    return fit.fe_params["Intercept"], fit.bse["Intercept"], item, seed, fit.scale


def _gaussian(rng, delta=0.05, items=200, seeds=3, sd_item=0.3, sd_seed=0.03, sd_res=0.3):
    return (delta + rng.normal(0, sd_item, items)[:, None] + rng.normal(0, sd_seed, seeds)[None, :]
            + rng.normal(0, sd_res, (items, seeds)))


def _binary(rng, items=200, seeds=3):
    """The study's shape: a base run repeated across seeds, a trained variant per seed, 0/1 correctness."""
    difficulty = rng.normal(0, 1.5, items)[:, None]
    base = np.tile(rng.random((items, 1)) < 1 / (1 + np.exp(-difficulty)), (1, seeds))
    after = rng.random((items, seeds)) < 1 / (1 + np.exp(-(difficulty + 0.6 + rng.normal(0, 0.4, seeds))))
    return base, after


@pytest.mark.parametrize("data", ["gaussian", "binary"])
def test_variance_components_and_se_agree_with_statsmodels_mixedlm(data):
    rng = np.random.default_rng(3)
    if data == "gaussian":
        after = _gaussian(rng, delta=0.2, sd_item=0.5, sd_seed=0.3, sd_res=0.6)
        before = np.zeros_like(after)
    else:
        before, after = _binary(rng)
    ours = variance_components(before, after)
    assert min(ours) > 0  # inside the parameter space, where REML and ANOVA coincide
    c = crossed_difference(before, after)
    mean, se, item, seed, residual = _mixedlm(np.asarray(after, float) - before)
    assert c.delta == pytest.approx(mean, abs=1e-9)  # balanced: the GLS mean is the grand mean
    assert ours == pytest.approx((item, seed, residual), rel=2e-3)
    assert math.sqrt(c.variance) == pytest.approx(se, rel=1e-3)


def test_a_known_effect_is_recovered_and_covered_95_percent_of_the_time():
    """400 replicates of 200 items x 3 seeds; the seed term is about a third of Var(D), so df are ~4-40."""
    rng = np.random.default_rng(12345)
    delta, reps = 0.05, 400
    estimates, covered, ses = [], 0, []
    for _ in range(reps):
        d = _gaussian(rng, delta)
        c = crossed_difference(np.zeros_like(d), d)
        lo, hi = crossed_tests(c, 0.05, 0.05, 0.8)[0]
        covered += lo <= delta <= hi
        estimates.append(c.delta)
        ses.append(math.sqrt(c.variance))
    # Var(D) = 0.3^2 / 200 + 0.03^2 / 3 + 0.3^2 / 600 = 0.0009: sd 0.030, so the mean of 400 has sd 0.0015.
    true_sd = math.sqrt(0.3**2 / 200 + 0.03**2 / 3 + 0.3**2 / 600)
    assert np.mean(estimates) == pytest.approx(delta, abs=4 * true_sd / math.sqrt(reps))
    assert np.std(estimates) == pytest.approx(true_sd, rel=0.15)
    tolerance = 3 * math.sqrt(0.95 * 0.05 / reps)  # 0.033
    assert abs(covered / reps - 0.95) <= tolerance, covered / reps


def test_a_known_effect_on_binary_data_is_found():
    """The study's shape with a real gain: the crossed comparison calls it better, its interval holding the truth."""
    rng = np.random.default_rng(5)
    # The population difference of this model, by Monte Carlo over items and seeds (1e6 draws).
    difficulty, shift = rng.normal(0, 1.5, 10**6), rng.normal(0, 0.4, 10**6)
    truth = float(np.mean(1 / (1 + np.exp(-(difficulty + 0.6 + shift))) - 1 / (1 + np.exp(-difficulty))))
    before, after = _binary(rng)
    c = compare_seeds(before, after, 0.05, 0.05, 0.8)
    assert c.verdict == "better" and c.ci[0] <= truth <= c.ci[1]
