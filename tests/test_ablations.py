"""Ablation splits, the scaffolding (schema check, best-of-N choice, JSON repair) and the verdicts."""

import copy
import json
import re
from collections import Counter

import pytest

from test_data import fixture_rows
from toolcall.bfcl import CATEGORIES, ablations
from toolcall.bfcl.rows import is_extra
from toolcall.bfcl.split import split_study, with_sources
from toolcall.calls.parsing import parse_calls
from toolcall.config import AblationSplitConfig, DiversityConfig, ExtraDataConfig, ReportConfig
from toolcall.errors import DataError
from toolcall.evaluate import scaffold
from toolcall.report.ablations import ablation_sections, scaffold_table
from toolcall.report.main import claim_relation
from toolcall.report.paired import compare_table, holm
from toolcall.report.verdicts import Claim, render_claims


def near_duplicate_keys(rows):
    """Every way two functions count as the same tool, written out independently of function_keys."""
    keys = set()
    for row in rows:
        for fn in row["functions"]:
            norm = re.sub(r"[^a-z0-9]", "", fn["name"].lower())
            keys |= {("name", fn["name"]), ("norm", norm),
                     ("norm", re.sub(r"[^a-z0-9]", "", fn["name"].rsplit(".", 1)[-1].lower()))}
            props = fn["parameters"].get("properties", {})
            if props:
                keys.add(("params", frozenset(props)))
    return keys


def with_near_duplicates(rows):
    """The fixture rows plus renamed copies: CamelCase, a namespace, same parameters under a new name."""
    extra = []
    for i, (src, rename) in enumerate([(0, lambda n: n.title().replace("_", "")), (13, lambda n: "ns." + n),
                                       (26, lambda n: "totally_new_name")]):
        row = copy.deepcopy(rows[src])
        row["id"] += f"_dup{i}"
        old = row["functions"][0]["name"]
        row["functions"][0]["name"] = rename(old)
        row["ground_truth"] = [{rename(k) if k == old else k: v for k, v in e.items()} for e in row["ground_truth"]]
        extra.append(row)
    return rows + extra


@pytest.mark.parametrize("seed", range(5))
def test_unseen_tools_split_shares_no_function_or_near_duplicate(seed):
    train, test = ablations.make_split("unseen_tools", with_near_duplicates(fixture_rows()), [],
                                       AblationSplitConfig(seed=seed, test_per_category=2))
    assert Counter(r["category"] for r in test) == {c: 2 for c in CATEGORIES}
    assert not near_duplicate_keys(train) & near_duplicate_keys(test)
    assert len(train) + len(test) == 48 + 3


def test_unseen_patterns_split_tests_one_pattern_and_trains_on_the_others():
    rows = fixture_rows()
    train, test = ablations.make_split("unseen_patterns", rows[:30], rows[30:],
                                       AblationSplitConfig(seed=0, test_per_category=3))
    assert {r["category"] for r in test} == {"parallel_multiple"} and len(test) == 3
    assert {r["category"] for r in train} == {"simple", "multiple", "parallel"}
    assert not {f["name"] for r in train for f in r["functions"]} & {f["name"] for r in test for f in r["functions"]}


def test_diversity_arms_have_the_same_budget_and_their_categories():
    rows = fixture_rows()
    low, no_test = ablations.make_split("diversity_low", rows, [], DiversityConfig(seed=0, budget=10))
    high, _ = ablations.make_split("diversity_high", rows, [], DiversityConfig(seed=0, budget=10))
    assert no_test is None and len(low) == len(high) == 10
    assert Counter(r["category"] for r in low) == {"simple": 10}
    assert Counter(r["category"] for r in high) == {"simple": 3, "multiple": 3, "parallel": 2, "parallel_multiple": 2}
    with pytest.raises(DataError, match="lower ablations.diversity.budget"):
        ablations.make_split("diversity_low", rows, [], DiversityConfig(seed=0, budget=13))


def with_extra():
    """``(train, valid, test, pool)``: the fixture rows split as the main study splits them, every fixture extra
    source on the training side (data.extra: all of them), and the extra pool."""
    from test_data import fixture_extra

    extra = [r for rows in fixture_extra().values() for r in rows]
    train, valid, test, pool, _ = split_study(fixture_rows(), extra, 2, 1, seed=0)
    return with_sources(train, pool, sorted({r["source"] for r in pool}), "data.extra"), valid, test, pool


def test_extra_with_adds_the_pool_rows_of_its_sources_to_the_paper_rows():
    train, _, _, pool = with_extra()
    paper = [r for r in train if not is_extra(r)]
    arm, no_test = ablations.make_split("extra_with", train, [], ExtraDataConfig(sources=["exec_simple"]), pool=pool)
    assert no_test is None and arm == paper + [r for r in pool if r["source"] == "exec_simple"] and len(arm) > len(paper)
    every, _ = ablations.make_split("extra_with", train, [],
                                    ExtraDataConfig(sources=sorted({r["source"] for r in pool})), pool=pool)
    assert every == paper + pool  # whatever data.extra put into train: the paper's rows plus the arm's sources
    with pytest.raises(DataError, match=r"ablations.extra.sources names \['exec_simpel'\], but no validated"):
        ablations.make_split("extra_with", train, [], ExtraDataConfig(sources=["exec_simpel"]), pool=pool)


def test_extra_with_refuses_a_live_test_source_naming_the_key(tmp_path):
    from test_errors import PARAMS, one_line_error, stage

    params = {"ablations": {**PARAMS["ablations"], "extra": {"sources": ["exec_simple", "live_simple"]}}}
    proc = stage("ablation_split", "extra_with", tmp_path / "validated", tmp_path / "out", cwd=tmp_path, params=params)
    assert one_line_error(proc, "ablation_split") == (
        "ablation_split: params.yaml ablations.extra.sources=['exec_simple', 'live_simple'] trains on ['live_simple'], "
        "which split.live_test tests on: a live test row is never a training row; remove them from "
        "ablations.extra.sources (or from split.live_test)")
    assert not (tmp_path / "out").exists()


def test_diversity_arms_draw_from_the_training_rows_and_the_extra_pool():
    train, _, _, pool = with_extra()
    paper = [r for r in train if not is_extra(r)]
    simple = [r for r in paper + pool if r["category"] == "simple"]
    n_paper_simple = sum(r["category"] == "simple" for r in paper)
    low, _ = ablations.make_split("diversity_low", paper, [], DiversityConfig(seed=0, budget=len(simple)), pool=pool)
    assert len(simple) > n_paper_simple and sorted(r["id"] for r in low) == sorted(r["id"] for r in simple)
    # data.extra's rows are in both the training split and the pool: drawn once
    low2, _ = ablations.make_split("diversity_low", train, [], DiversityConfig(seed=0, budget=len(simple)), pool=pool)
    assert sorted(r["id"] for r in low2) == sorted(r["id"] for r in low)
    with pytest.raises(DataError, match="training split and extra pool have"):
        ablations.make_split("diversity_low", paper, [], DiversityConfig(seed=0, budget=len(simple) + 1), pool=pool)


def test_unseen_splits_with_extra_rows_test_on_the_paper_rows_only():
    train, valid, test, _ = with_extra()
    tools, tools_test = ablations.make_split("unseen_tools", train, test, AblationSplitConfig(seed=0, test_per_category=2),
                                             valid=valid)
    assert not any(is_extra(r) for r in tools_test) and any(is_extra(r) for r in tools)
    assert not near_duplicate_keys(tools) & near_duplicate_keys(tools_test)
    # The paper rows of every side are re-split: none is lost, none doubled.
    assert sorted(r["id"] for r in tools + tools_test if not is_extra(r)) == sorted(
        r["id"] for r in train + valid + test if not is_extra(r))
    patterns, patterns_test = ablations.make_split("unseen_patterns", train, test,
                                                   AblationSplitConfig(seed=0, test_per_category=3), valid=valid)
    assert {r["category"] for r in patterns} == {"simple", "multiple", "parallel"}  # no parallel_multiple extra rows
    assert any(is_extra(r) for r in patterns) and not any(is_extra(r) for r in patterns_test)
    assert not ({f["name"] for r in patterns for f in r["functions"]}
                & {f["name"] for r in patterns_test for f in r["functions"]})


# ---------------------------------------------------------------- scaffolding

FUNCTIONS = [{"name": "area", "parameters": {"type": "dict", "required": ["width"], "properties": {
    "width": {"type": "float"}, "unit": {"type": "string"}, "sides": {"type": "array", "items": {"type": "integer"}},
    "exact": {"type": "boolean"}}}}]
ROW = {"id": "q1", "category": "simple", "messages": [{"role": "user", "content": "area?"}], "functions": FUNCTIONS,
       "ground_truth": [{"area": {"width": [2.0], "unit": ["", "m"]}}]}


def call(args, name="area"):
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


@pytest.mark.parametrize("text, problem", [
    (call({"width": 2}), None),  # an int is a fine float
    (call({"width": 2.5, "sides": [3, 4], "exact": True, "unit": "m"}), None),
    (call({"width": 2}, name="volume"), "schema:unknown_function"),
    (call({"unit": "m"}), "schema:missing_required"),
    (call({"width": 2, "colour": "red"}), "schema:unknown_parameter"),
    (call({"width": "2"}), "schema:wrong_type"),
    (call({"width": True}), "schema:wrong_type"),  # bool is no number
    (call({"width": 2, "sides": [3, "4"]}), "schema:wrong_type"),
    ('<tool_call>{"name": "area", "arguments": {"width": 2,}}</tool_call>', "parse:malformed_json"),
    ("no call", "parse:no_call"),
])
def test_output_problem(text, problem):
    assert scaffold.output_problem(text, FUNCTIONS) == problem


class Poisoned(dict):
    """A row whose answer raises if anything looks at it."""

    def __getitem__(self, key):
        if key == "ground_truth":
            raise AssertionError("best-of-N read the answer")
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


SAMPLES = {
    "schema": ["garbage", call({"width": "x"}), call({"width": 3.0}), call({"width": 2.0})],
    "vote": [call({"width": "a"}), call({"width": "b"}), "<tool_call>{bad", call({"width": "b"}), "<tool_call>{bad"],
}


@pytest.mark.parametrize("kind", SAMPLES)
def test_best_of_n_choice_never_reads_the_answer(kind):
    samples = SAMPLES[kind]
    chosen = scaffold.select(ROW, samples)
    without = {k: v for k, v in ROW.items() if k != "ground_truth"}
    wrong = dict(ROW, ground_truth=[{"area": {"width": [99.0]}}])
    poisoned = Poisoned(ROW)
    assert chosen == scaffold.select(without, samples) == scaffold.select(wrong, samples) \
        == scaffold.select(poisoned, samples)
    assert chosen == ((2, "schema") if kind == "schema" else (1, "vote"))  # first fit; most frequent, earliest


def test_best_of_n_records_score_the_choice_and_the_oracle():
    records = scaffold.best_of_n([ROW, dict(ROW, id="q2")], [SAMPLES["schema"], SAMPLES["vote"]])
    assert [(r["chosen"], r["valid"], r["oracle"], r["n_correct"]) for r in records] == [
        (2, False, True, 1), (1, False, False, 0)]  # the gold width is 2.0: sample 3 was right, sample 2 was kept
    m = scaffold.best_of_n_summary(records, {"q1": True, "q2": False})
    assert m["overall"]["correct"] == 0 and m["oracle"]["correct"] == 1
    assert m["paired"] == {"before": "greedy", "after": "best_of_n", "both_correct": 0, "only_before": 1,
                           "only_after": 0, "both_wrong": 1}
    assert m["chosen_by"] == {"schema": 1, "vote": 1} and "p_value" not in json.dumps(m)


def test_first_per_category_keeps_file_order():
    rows = [{"id": i, "category": c} for i, c in enumerate("aabab")]
    assert [r["id"] for r in scaffold.first_per_category(rows, 1)] == [0, 2]
    assert scaffold.first_per_category(rows, None) == rows


BROKEN = {
    "trailing comma": '<tool_call>{"name": "area", "arguments": {"width": 2.0,}}</tool_call>',
    "single quotes": "<tool_call>{'name': 'area', 'arguments': {'width': 2.0}}</tool_call>",
    "missing closing brace": '<tool_call>{"name": "area", "arguments": {"width": 2.0}</tool_call>',
}


@pytest.mark.parametrize("name", BROKEN)
def test_json_repair_fixes_broken_outputs_and_counts_them(name):
    import json_repair

    text = BROKEN[name]
    assert parse_calls(text).error_type == "parse:malformed_json"
    fixed = parse_calls(text, repair=json_repair.repair_json)
    assert fixed.error_type is None and fixed.repaired
    assert fixed.calls == [{"name": "area", "arguments": {"width": 2.0}}]
    greedy = [{"id": "q1", "raw": text, "calls": [], "valid": False, "error_type": "parse:malformed_json"}]
    new = scaffold.repair([ROW], greedy)
    assert new[0]["changed"] and new[0]["valid"]
    m = scaffold.repair_summary(greedy, new)
    assert m["repair"] == {"malformed_json_before": 1, "changed": 1, "changed_and_correct": 1}
    assert m["paired"] == {"before": "greedy", "after": "json_repair", "both_correct": 0, "only_before": 0,
                           "only_after": 1, "both_wrong": 0}


def test_json_repair_leaves_valid_and_tagless_outputs_alone():
    greedy = [{"id": "q1", "raw": call({"width": 2.0}), "calls": [{"name": "area", "arguments": {"width": 2.0}}],
               "valid": True, "error_type": None}]
    greedy.append({"id": "q1", "raw": "I cannot", "calls": [], "valid": False, "error_type": "parse:no_call"})
    assert [r["changed"] for r in scaffold.repair([ROW], greedy)] == [False, False]


CFG = ReportConfig(equivalence_margin=0.05, alpha=0.05, power=0.8)


# Tables are (both, only_base, only_other, neither); claims in points, as the reports pass them.
@pytest.mark.parametrize("table, claimed, relation", [
    # The sign alone no longer reproduces a claim: unseen tools 0 -> 16% against the paper's 30 -> 79%.
    ((0, 0, 13, 67), 49.0, "same direction, smaller than claimed (95% CI excludes it)"),
    ((24, 3, 24, 149), 12.5, "consistent with the claimed size (95% CI includes it)"),
    ((0, 0, 60, 140), 10.0, "same direction, larger than claimed"),
    ((0, 30, 0, 170), 10.0, "opposite direction (95% CI excludes it)"),
    ((0, 30, 0, 170), -5.0, "same direction, larger than claimed"),  # a claimed loss, and a larger one
    ((0, 0, 1, 49), 42.0, "direction not shown, smaller than claimed"),
    ((27, 3, 0, 170), 30.0, "no effect beyond ±5 pts, smaller than claimed"),
    # Claims of no effect (the paper's "< 1 point", "no benefit") are equivalence tests within the margin.
    ((51, 1, 2, 146), 0.7, "holds (equivalent)"),
    ((200, 0, 0, 0), 0.0, "holds (equivalent)"),
    ((4000, 100, 300, 5600), 0.0, "holds up to the margin"),
    ((0, 0, 20, 180), 0.0, "not reproduced: it helps"),
    ((47, 5, 11, 137), 1.0, "undecided at this n"),
    ((47, 5, 11, 137), None, "paper: no number given"),
])
def test_claim_relation(table, claimed, relation):
    assert relation in claim_relation(compare_table(table, 0.05, 0.05, 0.8), claimed, CFG)


def test_claims_are_rendered_with_holm_over_the_whole_family():
    strong = compare_table((0, 0, 13, 67), 0.05, 0.05, 0.8)  # exact McNemar p = 2 / 2^13
    weak = compare_table((47, 5, 11, 137), 0.05, 0.05, 0.8)  # p = 0.2101
    lines = render_claims(["## A section", Claim("strong", strong, 49.0),
                                  Claim("weak", weak, None), "- other: not run"], CFG)
    assert lines[0] == "## A section" and lines[3] == "- other: not run"
    assert lines[1].startswith("- strong: **better**: ours +16.2 pts [+8.3, +25.8] on n=80 paired items")
    # The family is both claims' difference and equivalence tests: 4 p-values. The strongest is multiplied by 4.
    adjusted = holm([strong.p_value, weak.p_value, strong.p_equivalence, weak.p_equivalence])
    assert adjusted[0] == pytest.approx(4 * strong.p_value)
    assert f"Holm p={adjusted[0]:.3f}, TOST Holm p={adjusted[2]:.3f}; after Holm: better" in lines[1]
    assert f"Holm p={adjusted[1]:.3f}, TOST Holm p={adjusted[3]:.3f}; after Holm: inconclusive" in lines[2]
    assert lines[2].startswith("- weak: **inconclusive**") and "MDE 5.6 pts" in lines[2]


def test_scaffold_table_reads_the_stored_table_and_checks_it_against_the_arm():
    # Best-of-N on 60 items: 19 correct, 4 lost and 1 gained against greedy -> 18 both, 37 neither.
    stored = {"overall": {"n": 60, "correct": 19},
              "paired": {"before": "greedy", "after": "best_of_n", "both_correct": 18, "only_before": 4,
                         "only_after": 1, "both_wrong": 37}}
    assert scaffold_table(stored) == (18, 4, 1, 37)
    with pytest.raises(ValueError):  # a table over other items than the arm's
        scaffold_table({**stored, "overall": {"n": 200, "correct": 19}})
    with pytest.raises(ValueError):  # a stored table that disagrees with the arm's own count
        scaffold_table({**stored, "overall": {"n": 60, "correct": 20}})


def test_ablation_sections_render(tmp_path):
    ids = [f"q{i}" for i in range(40)]
    sft = {i: k % 2 == 0 for k, i in enumerate(ids)}
    metric = {"overall": {"accuracy": 0.5, "n": 40, "correct": 20, "ci95": [0.35, 0.65]}, "by_category": {}}
    (tmp_path / "ablations" / "eval").mkdir(parents=True)
    for arm in ("diversity_low", "diversity_high"):
        (tmp_path / "ablations" / "eval" / f"{arm}.json").write_text(json.dumps(metric))
    lines = ablation_sections(tmp_path, tmp_path / "none", {"base": metric}, {
        "diversity_low": sft, "diversity_high": {i: not v for i, v in sft.items()}}, CFG)
    assert lines[0].startswith("Paired comparisons") and "makes 1 paired comparison," in lines[0]
    assert "Holm p adjusts each over all 2" in lines[0]
    assert any(line.startswith("- low → high diversity: **inconclusive**") for line in lines)


def test_extra_sources_section_pairs_the_arm_with_the_main_sft_on_the_same_items(tmp_path):
    ids = [f"q{i}" for i in range(40)]
    metric = {"overall": {"accuracy": 0.75, "n": 40, "correct": 30, "ci95": [0.6, 0.86]}, "by_category": {}}
    for kind in ("eval", "train"):
        (tmp_path / "ablations" / kind).mkdir(parents=True)
    (tmp_path / "ablations" / "eval" / "extra_with.json").write_text(json.dumps(metric))
    (tmp_path / "ablations" / "train" / "extra_with.json").write_text(
        json.dumps({"examples": 1718, "steps_trained": 240}))
    main = {**metric, "overall": {"accuracy": 0.5, "n": 40, "correct": 20, "ci95": [0.35, 0.65]}}
    lines = ablation_sections(tmp_path, tmp_path / "none", {"sft": main}, {
        "extra_with": {i: k < 30 for k, i in enumerate(ids)}, "sft": {i: k < 10 for k, i in enumerate(ids)}},
        CFG, sft_train={"examples": 689, "steps_trained": 300})
    assert "## Extra training sources (BFCL live_* / exec_* rows from the same wheel)" in lines
    assert any(line.startswith("| The main SFT: the paper's rows + data.extra | 50.0% [35.0–65.0] (n=40) |")
               and line.endswith("| 689 | 300 |") for line in lines)
    assert any(line.startswith("| The paper's rows + ablations.extra.sources | 75.0%") and line.endswith(
        "| 1718 | 240 |") for line in lines)
    assert any(line.startswith("- main SFT → + ablations.extra.sources: **better**: ours +50.0 pts") and
               line.endswith("this study: no number given") for line in lines)