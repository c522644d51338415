"""The power table's projections (toolcall/report/power.py) and metrics/study.json against the report."""

import json
import math
import subprocess

import numpy as np
import pytest
from scipy.stats import norm

from test_report import CFG, report_stage, study  # noqa: F401 (the fixture)
from toolcall.config import ReportConfig
from toolcall.report.crossed import crossed_difference, crossed_tests, variance_components
from toolcall.report.main import STEP_KEYS, load_runs, step_comparisons
from toolcall.report.power import projected, projected_mde, seeds_needed, study_metrics

ALPHA, POWER = 0.05, 0.8
# Roughly the committed study's steps: (sigma_item^2, sigma_seed^2, sigma_res^2).
SFT_VS_BASE, DPO_VS_SFT = (0.176, 0.0002, 0.051), (0.104, 0.0014, 0.100)


def _binary_runs(rng, n, seeds, p_before, lift, seed_sd):
    """items x seeds 0/1 correctness: before, and after with a per-seed shift in its success probability."""
    before = rng.random((n, seeds)) < p_before
    shift = lift + seed_sd * rng.standard_normal(seeds)
    after = rng.random((n, seeds)) < np.clip(p_before + shift, 0, 1)[None, :]
    return before, after


@pytest.mark.parametrize("seed", range(6))
def test_projecting_to_the_runs_own_design_gives_back_its_mde(seed):
    rng = np.random.default_rng(seed)
    n, seeds = [(200, 3), (50, 2), (120, 5), (30, 10), (200, 3), (80, 4)][seed]
    before, after = _binary_runs(rng, n, seeds, 0.35, 0.05 * (seed - 2), 0.03 * seed)
    c = crossed_difference(before, after)
    mde = crossed_tests(c, 0.05, ALPHA, POWER)[4]
    components = variance_components(before, after)
    variance, df = projected(components, n, seeds)
    assert variance == pytest.approx(c.variance, rel=1e-9, abs=1e-15)
    assert df == pytest.approx(c.df, rel=1e-9) or df == c.df == math.inf
    assert projected_mde(components, n, seeds, ALPHA, POWER) == pytest.approx(mde, rel=1e-9)


def test_a_negative_component_counts_as_zero_as_in_the_analysis():
    d = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)  # items disagree less than chance
    components = variance_components(np.zeros_like(d), d)
    assert components[0] < 0
    c = crossed_difference(np.zeros_like(d), d)
    assert projected(components, 4, 3) == pytest.approx((c.variance, c.df))


@pytest.mark.parametrize("components", [SFT_VS_BASE, DPO_VS_SFT, (0.02, 0.0, 0.11)])
def test_the_mde_falls_with_more_seeds(components):
    for items in (200, 1000, 1550, math.inf):
        mdes = [projected_mde(components, items, s, ALPHA, POWER) for s in (2, 3, 5, 10, 30)]
        assert mdes == sorted(mdes, reverse=True)
        assert mdes[0] > mdes[-1] or (math.isinf(items) and components[1] == 0 and mdes[0] == 0)


@pytest.mark.parametrize("components, seeds", [(SFT_VS_BASE, 3), (SFT_VS_BASE, 10), (DPO_VS_SFT, 10),
                                               ((0.02, 0.0, 0.11), 3), ((0.1, 0.0, 0.1), 2)])
def test_the_mde_falls_with_more_items(components, seeds):
    mdes = [projected_mde(components, n, seeds, ALPHA, POWER) for n in (50, 200, 1000, 1550)]
    assert mdes == sorted(mdes, reverse=True) and mdes[0] > mdes[-1]
    if components[1] == 0:  # no seed term: items alone drive it to 0
        assert projected_mde(components, 10**9, seeds, ALPHA, POWER) < 1e-3


def test_few_seeds_can_cost_more_than_the_items_save():
    """With 3 seeds and a seed term, Satterthwaite's df fall towards S - 1 = 2 as items grow: the MDE can rise."""
    assert projected_mde(DPO_VS_SFT, math.inf, 3, ALPHA, POWER) > projected_mde(DPO_VS_SFT, 1550, 3, ALPHA, POWER)


@pytest.mark.parametrize("seeds", [2, 3, 5, 10, 30])
def test_infinite_items_leave_the_seed_term(seeds):
    item, seed, residual = DPO_VS_SFT
    variance, df = projected(DPO_VS_SFT, math.inf, seeds)
    assert variance == pytest.approx(seed / seeds) and df == seeds - 1
    huge, huge_df = projected(DPO_VS_SFT, 10**12, seeds)
    assert huge == pytest.approx(variance, rel=1e-6) and huge_df == pytest.approx(df, rel=1e-4)
    z = float(norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))  # t quantiles at any df are above these
    for n in (200, 1550, 10**6):  # never below the seed floor, however many items
        assert projected(DPO_VS_SFT, n, seeds)[0] > seed / seeds
        assert projected_mde(DPO_VS_SFT, n, seeds, ALPHA, POWER) > z * math.sqrt(seed / seeds)
    assert projected(DPO_VS_SFT, 200, math.inf) == pytest.approx((item / 200, 199))


def test_seeds_needed_is_the_first_design_at_the_target_or_none():
    s = seeds_needed(DPO_VS_SFT, 1550, 0.05, ALPHA, POWER)
    assert s is not None and projected_mde(DPO_VS_SFT, 1550, s, ALPHA, POWER) <= 0.05
    assert projected_mde(DPO_VS_SFT, 1550, s - 1, ALPHA, POWER) > 0.05
    assert seeds_needed(DPO_VS_SFT, 200, 0.05, ALPHA, POWER) is None  # the item term alone is above 5 pts
    assert seeds_needed((0.0, 0.01, 0.0), 10**6, 0.05, ALPHA, POWER, max_seeds=30) is None  # the seed term is
    assert seeds_needed((0.0, 0.0, 0.0), 200, 0.05, ALPHA, POWER) == 2


def test_study_json_is_keyed_by_test_set_and_step_and_rounded(study):  # noqa: F811
    runs = load_runs(study / "data/predictions", ["base", "sft", "sft_dpo", "sft_rl"], [0, 1])
    steps = step_comparisons(runs, CFG)
    out = study_metrics({"test": steps}, STEP_KEYS, CFG)
    assert list(out) == ["test"] and list(out["test"]) == ["sft_vs_base", "dpo_vs_sft", "rft_vs_sft"]
    entry = out["test"]["dpo_vs_sft"]
    assert set(entry) >= {"items", "seeds", "delta", "ci95", "mde", "verdict", "p_holm", "p_tost_holm", "variance"}
    assert entry["items"] == 8 and entry["seeds"] == 2 and entry["delta"] == 0.0625
    assert list(entry["variance"]) == ["item", "seed", "residual"]
    json.dumps(out, allow_nan=False)  # no inf / nan: valid JSON
    for value in [entry["delta"], *entry["ci95"], *entry["variance"].values()]:
        assert value == round(value, 6)


def test_the_stages_json_matches_the_reports_numbers(study):  # noqa: F811
    cmd, env, params = report_stage(study, "--metrics", "metrics/study.json")
    first = (study / "metrics/study.json").read_bytes()
    assert subprocess.run(cmd, cwd=study, env=env).returncode == 0
    assert (study / "metrics/study.json").read_bytes() == first  # byte-stable
    metrics = json.loads(first)["test"]
    text = (study / "reports/post_sft.md").read_text()
    names = {"sft_vs_base": "SFT vs Base model", "dpo_vs_sft": "SFT + DPO vs SFT", "rft_vs_sft": "SFT + RL vs SFT"}
    cells = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    rows = {c[0].strip("| "): c for c in cells if len(c) == 10}  # the step table
    power_rows = {c[0].strip("| "): c for c in cells if len(c) == 8}  # the power table's components
    cfg = ReportConfig(**params["report"])
    for key, name in names.items():
        m, row = metrics[key], rows[name]
        assert row[1] == f"{m['items']} × {m['seeds']}"
        lo, hi = m["ci95"]
        assert row[2] == f"{100 * m['delta']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        assert f"({m['p_holm']:.3f})" in row[4] and f"({m['p_tost_holm']:.3f})" in row[5]
        assert row[6] == (f"{100 * m['mde']:.1f} pts" if m["mde"] is not None else "none (too few items)")
        assert row[7].startswith(m["verdict"]) or (m["verdict"] == "equivalent" and row[7].startswith("equivalent"))
        assert row[8] == m["verdict_holm"]
        assert [f"{v:.5f}" for v in m["variance"].values()] == power_rows[name][2:5]
        assert power_rows[name][5] == row[6]  # the MDE as run
    assert cfg.alpha == 0.05  # "ci95" is the 1 - alpha interval
