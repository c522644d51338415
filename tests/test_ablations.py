"""Ablation splits, the scaffolding (schema check, best-of-N choice, JSON repair) and the verdicts."""

import copy
import json
import re
from collections import Counter

import pytest

from test_data import fixture_rows
from toolcall import ablations, data, scaffold
from toolcall.config import AblationSplitConfig, DiversityConfig
from toolcall.parsing import parse_calls
from toolcall.report import claim_verdict


def near_duplicate_keys(rows):
    """Every way two functions count as the same tool, written out independently of data.function_keys."""
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
    assert Counter(r["category"] for r in test) == {c: 2 for c in data.CATEGORIES}
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
    with pytest.raises(data.DataError, match="lower ablations.diversity.budget"):
        ablations.make_split("diversity_low", rows, [], DiversityConfig(seed=0, budget=13))


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
    assert m["vs_greedy"]["only_base"] == 1 and m["chosen_by"] == {"schema": 1, "vote": 1}


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
    assert m["vs_greedy"]["only_other"] == 1


def test_json_repair_leaves_valid_and_tagless_outputs_alone():
    greedy = [{"id": "q1", "raw": call({"width": 2.0}), "calls": [{"name": "area", "arguments": {"width": 2.0}}],
               "valid": True, "error_type": None}]
    greedy.append({"id": "q1", "raw": "I cannot", "calls": [], "valid": False, "error_type": "parse:no_call"})
    assert [r["changed"] for r in scaffold.repair([ROW], greedy)] == [False, False]


@pytest.mark.parametrize("pc, paper_delta, word", [
    ({"n": 200, "delta": 0.0, "only_base": 0, "only_other": 0, "p_value": 1.0}, 0, "reproduced"),
    ({"n": 200, "delta": 0.01, "only_base": 0, "only_other": 2, "p_value": 0.5}, 0, "inside the noise"),
    ({"n": 200, "delta": 0.1, "only_base": 0, "only_other": 20, "p_value": 0.0001}, 0, "contradicted"),
    ({"n": 80, "delta": 0.3, "only_base": 2, "only_other": 26, "p_value": 0.0001}, 49.0, "reproduced"),
    ({"n": 80, "delta": -0.3, "only_base": 26, "only_other": 2, "p_value": 0.0001}, 49.0, "contradicted"),
    ({"n": 80, "delta": 0.05, "only_base": 3, "only_other": 7, "p_value": 0.34}, 26.0, "inside the noise at this n"),
])
def test_claim_verdict(pc, paper_delta, word):
    assert claim_verdict(pc, paper_delta).startswith(f"**{word}")
