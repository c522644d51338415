"""The main study's report over seeds: Table 1's means and spreads, each seed paired with its own start,
the wrong_count share, and the rendered report (toolcall/report/main.py, stages/report.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from toolcall.config import ReportConfig
from toolcall.errors import DataError
from toolcall.evaluate.score import summarize
from toolcall.io import run_path, write_json, write_jsonl
from toolcall.report.main import (VARIANT_NAMES, correctness, leaderboard_table, load_runs, load_scores, main_table,
                                  paired_runs, paper_claims, step_comparisons, step_table, wrong_count_table)
from toolcall.report.verdicts import method_note

ROOT = Path(__file__).resolve().parents[1]
CFG = ReportConfig(equivalence_margin=0.05, alpha=0.05, power=0.8)
CATS = ("simple", "multiple", "parallel", "parallel_multiple")
IDS = [(f"{c}_{i}", c) for c in CATS for i in range(2)]  # 8 items, 2 per category
WRONG_COUNT = "parallel_function_checker_no_order:wrong_count"
# Which of the 8 items each run gets right (1) and, for a wrong one, whether its error is wrong_count (w).
RUNS = {
    ("base", None): "0000 0000",
    ("sft", 0): "1100 0000",     # 2/8
    ("sft", 1): "1111 0000",     # 4/8
    ("sft_dpo", 0): "1110 0000",  # seed 0: +1 item over its SFT
    ("sft_dpo", 1): "1111 00ww",  # seed 1: no change over its own SFT (but +2 over seed 0's SFT)
    ("sft_rl", 0): "1100 w000",  # the w is parallel_0
    ("sft_rl", 1): "1111 1000",
    ("sft_grpo", 0): "1100 0000",  # no change over its SFT in either seed
    ("sft_grpo", 1): "1111 0000",
}


def records(pattern):
    marks = pattern.replace(" ", "")
    return [{"id": i, "category": c, "raw": "", "calls": [], "valid": m == "1",
             "error_type": None if m == "1" else (WRONG_COUNT if m == "w" else "value_error:string")}
            for (i, c), m in zip(IDS, marks)]


@pytest.fixture
def study(tmp_path):
    for (variant, seed), pattern in RUNS.items():
        recs = records(pattern)
        write_jsonl(run_path(tmp_path / "data/predictions", variant, seed, ".jsonl"), recs)
        write_json(run_path(tmp_path / "metrics/eval", variant, seed, ".json"), summarize(recs))
    return tmp_path


def test_runs_are_read_per_seed_and_only_the_seeds_asked_for(study):
    stale = run_path(study / "data/predictions", "sft", 9, ".jsonl")  # a seed since dropped from study.seeds
    write_jsonl(stale, records("1111 1111"))
    runs = load_runs(study / "data/predictions", ["base", "sft"], [0, 1])
    assert sorted(set(zip(runs["variant"], runs["run"]))) == [("base", "greedy"), ("sft", "s0"), ("sft", "s1")]
    assert len(runs) == 3 * 8
    with pytest.raises(DataError, match=r"sft/s2.jsonl does not exist"):
        load_runs(study / "data/predictions", ["sft"], [0, 2])  # a seed with no eval yet


def test_table_1_shows_each_methods_mean_and_seed_spread(study):
    runs = load_runs(study / "data/predictions", list(VARIANT_NAMES), [0, 1])
    table = main_table(runs)
    # SFT: 25% and 50% -> mean 37.5, sd |0.25 - 0.5| / sqrt(2) = 17.7 points; simple 100% under both seeds.
    sft = "| SFT | 2 seeds | 37.5% (sd 17.7; 25.0–50.0) | 57.0% | 100.0% (100.0–100.0) | 50.0% (0.0–100.0) |"
    assert sft in table
    assert "| Base model | 1 greedy | 0.0% | 9.7% | 0.0% |" in table
    assert "Ours, overall (n=8)" in table and "simple (n=2)" in table


def test_each_seed_is_compared_with_its_own_start(study):
    runs = load_runs(study / "data/predictions", list(VARIANT_NAMES), [0, 1])
    before, after = paired_runs(runs, "sft", "sft_dpo")
    assert list(before.columns) == ["s0", "s1"] and list(before.index) == sorted(i for i, _ in IDS)
    steps = {s.after: s for s in step_comparisons(runs, CFG)}
    dpo = steps["sft_dpo"].comparison
    # Seed 0 gains one item, seed 1 none: tables (both, only SFT, only DPO, neither) per seed; Δ = (1/8 + 0) / 2.
    assert dpo.tables == ((2, 0, 1, 5), (4, 0, 0, 4)) and dpo.delta == pytest.approx(1 / 16)
    base = steps["sft"]  # base has one run: it stands against every seed's SFT
    assert base.comparison.tables == ((0, 0, 2, 6), (0, 0, 4, 4)) and base.start_runs == (0.0,)
    assert steps["sft_rl"].start_runs == (0.25, 0.5)


def test_runs_that_do_not_continue_their_own_seed_are_refused(study):
    runs = load_runs(study / "data/predictions", ["sft", "sft_dpo"], [0, 1])
    runs = runs[~((runs["variant"] == "sft_dpo") & (runs["run"] == "s1"))]
    with pytest.raises(DataError, match=r"sft_dpo's runs \['s0'\] do not match sft's \['s0', 's1'\]"):
        paired_runs(runs, "sft", "sft_dpo")


def test_step_table_judges_each_step_against_its_starts_seed_spread(study):
    runs = load_runs(study / "data/predictions", list(VARIANT_NAMES), [0, 1])
    steps = step_comparisons(runs, CFG)
    table = step_table(steps, CFG)
    assert "| SFT + DPO vs SFT | 8 × 2 | +6.2 pts" in table and "| +12.5, +0.0 |" in table
    # SFT's seeds span 25.0-50.0%: a 6.25-point step lies inside that range, 0.4 x its sd of 17.7.
    assert "|Δ| 6.2 pts inside SFT's seed range (25.0–50.0%, sd 17.7); 0.4× its sd" in table
    assert "Base model: one run, no seed spread" in table
    claims = paper_claims(steps, CFG)
    assert "SFT + DPO vs SFT: paper +0.7 pts, a claim of no effect beyond ±5 pts: undecided" in claims
    assert claims.count("after Holm:") == 4


def test_wrong_count_share_per_method_and_category(study):
    scores = load_scores(study / "metrics/eval", list(VARIANT_NAMES), [0, 1])
    table = wrong_count_table(scores)
    # SFT + DPO: seed 0 has no wrong_count (0 of 5 wrong), seed 1 two of 4 wrong -> 0% and 50%, mean 25%;
    # its parallel_multiple items are both wrong_count under seed 1 and both other errors under seed 0. Nothing
    # is wrong in simple under either seed (no share: "—"), nor in multiple under seed 1 (one share left).
    assert "| SFT + DPO | 4.5 | 25.0% (0.0–50.0) | — | 0.0% | 0.0% (0.0–0.0) | 50.0% (0.0–100.0) |" in table
    assert "| SFT + RL | 4.5 | 8.3% (0.0–16.7) |" in table  # seed 0: 1 of 6 wrong; seed 1: 0 of 3
    m = json.loads(run_path(study / "metrics/eval", "sft_dpo", 1, ".json").read_text())
    assert m["by_category"]["parallel_multiple"] == {**m["by_category"]["parallel_multiple"], "wrong_count": 2,
                                                     "wrong_count_share": 1.0}
    assert m["by_category"]["simple"]["wrong_count_share"] is None  # nothing wrong: no share


def test_leaderboard_table_puts_our_seed_means_beside_the_anchors(study):
    runs = load_runs(study / "data/predictions", ["base", "sft"], [0, 1])
    table = leaderboard_table(runs)
    # SFT per category over seeds 0 and 1: simple 100, multiple (0 + 100) / 2 = 50, parallel 0, pm 0 -> mean 37.5.
    assert "| SmolLM2-135M-Instruct, SFT (ours) | function-disjoint split | 100.0 | 50.0 | 0.0 | 0.0 | 37.5 |" in table
    assert "| Llama-3.2-1B-Instruct (FC) | full BFCL sets | 75 | 50.5 | 44 | 15 | 46.1 |" in table
    assert "| Granite-4.0-350m (FC) | full BFCL sets | 83 | 84.5 | 70 | 55.5 | 73.3 |" in table  # 73.25, half up


def report_stage(study, *extra):
    """``study`` set up for report_post_sft (seeds 0 and 1, a validate.json), and the stage's command and env;
    the stage is run once here, and must succeed."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["study"]["seeds"] = [0, 1]
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    write_json(study / "metrics/validate.json", {"test": {"n_kept": 8, "by_category": {c: 2 for c in CATS}},
                                                 "test_live": {"n_kept": 8, "by_category": {c: 2 for c in CATS}},
                                                 "train": {"n_kept": 20}, "template": "project"})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "stages.report", "metrics", "data/predictions", "reports", "--variants", "base",
           "sft", "sft_dpo", "sft_rl", "--name", "post_sft", *extra]
    proc = subprocess.run(cmd, cwd=study, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return cmd, env, params


def test_the_report_stage_writes_every_section(study):
    report_stage(study)
    text = (study / "reports/post_sft.md").read_text()
    for heading in ("## Table 1", "## Each step against the model it starts from", "## Beside BFCL's leaderboard",
                    "## The dominant failure", "## Errors"):
        assert heading in text
    assert "once per seed of `study.seeds` (0, 1)" in text and "(2 seeds)" in text and "over all 6" in text
    assert (study / "reports/post_sft.png").stat().st_size > 1000


def test_the_live_test_set_gets_its_steps_and_both_sets_pooled(study):
    # The live set: the same items' patterns under other ids, every SFT + DPO answer there right.
    for (variant, seed), pattern in RUNS.items():
        recs = [{**r, "id": "live_" + r["id"]} for r in records(pattern)]
        if variant == "sft_dpo":
            recs = [{**r, "valid": True, "error_type": None} for r in recs]
        write_jsonl(run_path(study / "data/predictions_live", variant, seed, ".jsonl"), recs)
    report_stage(study, "--live", "data/predictions_live", "--metrics", "metrics/study.json")
    text = (study / "reports/post_sft.md").read_text()
    assert "## The second test set: BFCL live" in text and "## Both test sets pooled" in text
    assert text.index("## Both test sets pooled") < text.index("### Both test sets pooled")  # power, after
    out = json.loads((study / "metrics/study.json").read_text())
    assert list(out) == ["test", "live", "pooled"]
    assert out["test"]["dpo_vs_sft"]["items"] == out["live"]["dpo_vs_sft"]["items"] == 8
    assert out["pooled"]["dpo_vs_sft"]["items"] == 16 and out["pooled"]["dpo_vs_sft"]["seeds"] == 2
    # live: seed 0's DPO 8/8 vs SFT 2/8, seed 1's 8/8 vs 4/8; the test set: +1/8 and 0; pooled: the mean over 16 x 2.
    assert out["live"]["dpo_vs_sft"]["delta"] == pytest.approx((6 + 4) / 16)
    assert out["pooled"]["dpo_vs_sft"]["delta"] == pytest.approx((6 + 4 + 1 + 0) / 32)


def test_one_seed_falls_back_to_newcombe_and_says_so(study):
    runs = load_runs(study / "data/predictions", ["base", "sft"], [1])
    (step,) = step_comparisons(runs, CFG)
    assert step.comparison.seeds == 1 and step.comparison.tables == ((0, 0, 4, 4),)
    assert "Newcombe" in method_note(CFG, 1, seeds=1)
    assert "random-effects" in method_note(CFG, 1, seeds=2)
    assert np.isfinite(step.comparison.ci).all()


def test_a_run_on_other_items_is_refused(study):
    path = run_path(study / "data/predictions", "sft", 1, ".jsonl")
    write_jsonl(path, records("1111 0000")[:-1])  # one item fewer than seed 0's run
    runs = load_runs(study / "data/predictions", ["sft"], [0, 1])
    with pytest.raises(DataError, match=r"sft's runs \['s1'\] lack items the other runs scored \(1 missing\)"):
        correctness(runs, "sft")


# Constrained decoding's runs (data/predictions_constrained): SFT gains two items under each seed, base one;
# SFT + DPO and SFT + RL answer as they did greedily.
CONSTRAINED = {("base", None): "1000 0000", ("sft", 0): "1111 0000", ("sft", 1): "1111 1100"}


def write_constrained(study):
    for (variant, seed), pattern in RUNS.items():
        write_jsonl(run_path(study / "data/predictions_constrained", variant, seed, ".jsonl"),
                    records(CONSTRAINED.get((variant, seed), pattern)))


def test_constrained_decoding_is_a_column_of_every_variant_and_seed(study):
    write_constrained(study)
    report_stage(study, "--constrained", "data/predictions_constrained", "--metrics", "metrics/study.json")
    text = (study / "reports/post_sft.md").read_text()
    section = text[text.index("## Constrained decoding, every variant and seed"):]
    section = section[:section.index("\n## ")]
    # SFT: seeds at 25% and 50% greedy, 50% and 75% constrained: +2 of 8 items under each seed.
    assert "| SFT | 8 × 2 | 37.5% (25.0–50.0) | 62.5% (50.0–75.0) | +25.0 pts [" in section
    assert "| Base model | 8 × 1 | 0.0% | 12.5% | +12.5 pts [" in section
    assert "| SFT + DPO | 8 × 2 | 43.8% (37.5–50.0) | 43.8% (37.5–50.0) | +0.0 pts [+0.0, +0.0] |" in section
    assert "Holm over these 4 comparisons" in section and "do not parse: 0 of 56" in section
    out = json.loads((study / "metrics/study.json").read_text())
    assert list(out) == ["test", "constrained"]
    assert list(out["constrained"]) == ["base", "sft", "sft_dpo", "sft_rl"]
    sft = out["constrained"]["sft"]
    assert (sft["items"], sft["seeds"], sft["delta"], sft["greedy"], sft["constrained"]) == (8, 2, 0.25, 0.375, 0.625)
    assert set(sft) >= {"ci95", "mde", "verdict", "p_holm", "verdict_holm", "variance"}
    assert out["constrained"]["base"]["seeds"] == 1 and "variance" not in out["constrained"]["base"]


def test_constrained_runs_on_other_items_are_refused(study):
    from toolcall.report.constrained import constrained_comparisons

    greedy = load_runs(study / "data/predictions", ["sft"], [0, 1])
    other = greedy.assign(id="other_" + greedy["id"])
    with pytest.raises(DataError, match=r"sft's constrained runs \(8 items, \['s0', 's1'\]\) are not its greedy"):
        constrained_comparisons(greedy, other, CFG)
