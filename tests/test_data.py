"""BFCL normalization and the leakage-free split."""

from collections import Counter
from pathlib import Path

import pytest

from configs import section
from toolcall import data

FIXTURE = Path(__file__).parent / "fixtures" / "bfcl"
FILES = section("data")["files"]


def fixture_rows():
    raw = data.read_source("local", FILES, local_dir=FIXTURE)
    return [r for cat, (q, a) in raw.items() for r in data.normalize(cat, q, a)]


def fn(name, *params):
    return {"name": name, "parameters": {"type": "dict", "properties": {p: {"type": "string"} for p in params}}}


def row(i, cat, *functions):
    return {"id": f"r{i}", "category": cat, "messages": [{"role": "user", "content": "q"}],
            "functions": list(functions), "ground_truth": [{functions[0]["name"]: {}}]}


def test_normalize_joins_answers_and_keeps_schema_types():
    rows = fixture_rows()
    assert len(rows) == 48 and Counter(r["category"] for r in rows) == {c: 12 for c in FILES}
    r = rows[0]
    assert set(r) == {"id", "category", "messages", "functions", "ground_truth"}
    assert r["messages"][0]["role"] == "user"
    assert r["functions"][0]["parameters"]["type"] == "dict"  # BFCL's own type names are kept


def test_malformed_rows_name_the_file_and_row(tmp_path):
    (tmp_path / "possible_answer").mkdir()
    (tmp_path / "x.json").write_text('{"id": "a", "question": [[]], "function": []}\n{not json\n')
    (tmp_path / "possible_answer" / "x.json").write_text('{"id": "a", "ground_truth": []}\n')
    with pytest.raises(data.DataError, match=r"x.json:2: not valid JSON"):
        data.read_source("local", {"simple": "x.json"}, local_dir=tmp_path)
    with pytest.raises(data.DataError, match="has no possible answer"):
        data.normalize("simple", [{"id": "b", "question": [[]], "function": []}], [], where="x.json")
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_source("local", {"simple": "missing.json"}, local_dir=tmp_path)


def test_gold_calls_take_first_allowed_value_and_omit_optional():
    gt = [{"f": {"a": [3, 4], "b": ["", "x"], "c": [""]}}, {"g": {}}]
    assert data.gold_calls(gt) == [{"name": "f", "arguments": {"a": 3, "b": "x"}}, {"name": "g", "arguments": {}}]


def offered(rows):
    return {f["name"] for r in rows for f in r["functions"]}


def test_split_is_stratified_seeded_and_leak_free_on_real_rows():
    rows = fixture_rows()
    train, test = data.split_rows(rows, test_per_category=3, seed=1)
    assert Counter(r["category"] for r in test) == {c: 3 for c in FILES}
    assert not offered(train) & offered(test)
    assert {r["id"] for r in train} | {r["id"] for r in test} == {r["id"] for r in rows}
    again = data.split_rows(rows, test_per_category=3, seed=1)
    assert [r["id"] for r in again[1]] == [r["id"] for r in test]
    other = data.split_rows(rows, test_per_category=3, seed=2)
    assert [r["id"] for r in other[1]] != [r["id"] for r in test]


def test_split_keeps_rows_sharing_a_function_together():
    # r0 and r1 share "f" through a distractor: they must land on the same side.
    rows = [row(0, "simple", fn("f")), row(1, "multiple", fn("g"), fn("f")), row(2, "simple", fn("h")),
            row(3, "multiple", fn("k")), row(4, "simple", fn("m")), row(5, "multiple", fn("n"))]
    for seed in range(10):
        train, test = data.split_rows(rows, test_per_category=1, seed=seed, test_categories=["simple", "multiple"])
        sides = {r["id"]: "test" for r in test} | {r["id"]: "train" for r in train}
        assert sides["r0"] == sides["r1"]
        assert not offered(train) & offered(test)


def test_strict_split_also_separates_near_duplicate_functions():
    rows = [row(0, "simple", fn("geo.distance", "a")), row(1, "simple", fn("GeoDistance", "z")),
            row(2, "simple", fn("area", "x", "y")), row(3, "simple", fn("volume", "x", "y")),
            row(4, "simple", fn("other", "q"))]
    groups = [sorted(rows[i]["id"] for i in g) for g in data.components(rows, strict=True)]
    assert ["r0", "r1"] in groups and ["r2", "r3"] in groups
    assert len(data.components(rows, strict=False)) == 5


def test_split_refuses_when_quota_cannot_be_met():
    rows = fixture_rows()
    with pytest.raises(data.DataError, match="lower split.test_per_category"):
        data.split_rows(rows, test_per_category=13, seed=0)


def test_held_out_category_split_trains_on_the_others():
    rows = fixture_rows()
    train, test = data.split_rows(rows, 4, seed=0, test_categories=["parallel_multiple"],
                                  train_categories=["simple", "multiple", "parallel"])
    assert {r["category"] for r in test} == {"parallel_multiple"}
    assert "parallel_multiple" not in {r["category"] for r in train}
    assert not offered(train) & offered(test)
