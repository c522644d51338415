"""BFCL normalization and the leakage-free split."""

import re
from collections import Counter
from pathlib import Path

import pytest

from configs import section
from toolcall.bfcl import CATEGORIES
from toolcall.bfcl.rows import gold_calls, is_extra
from toolcall.bfcl.sources import normalize, parse_call, read_extra, read_source
from toolcall.bfcl.split import (components, function_keys, split_rows, split_sides, split_study, study_sides,
                                  with_sources)
from toolcall.errors import DataError
from toolcall.io import read_json, read_jsonl, write_jsonl
from toolcall.wheels import pip_wheel, sha256_file

FIXTURE = Path(__file__).parent / "fixtures" / "bfcl"
FILES = section("data")["files"]


def fixture_rows():
    raw = read_source("local", FILES, local_dir=FIXTURE)
    return [r for cat, (q, a) in raw.items() for r in normalize(cat, q, a)]


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
    with pytest.raises(DataError, match=r"x.json:2: not valid JSON"):
        read_source("local", {"simple": "x.json"}, local_dir=tmp_path)
    with pytest.raises(DataError, match="has no possible answer"):
        normalize("simple", [{"id": "b", "question": [[]], "function": []}], [], where="x.json")
    with pytest.raises(DataError, match="does not exist"):
        read_source("local", {"simple": "missing.json"}, local_dir=tmp_path)


def test_gold_calls_take_first_allowed_value_and_omit_optional():
    gt = [{"f": {"a": [3, 4], "b": ["", "x"], "c": [""]}}, {"g": {}}]
    assert gold_calls(gt) == [{"name": "f", "arguments": {"a": 3, "b": "x"}}, {"name": "g", "arguments": {}}]


def offered(rows):
    return {f["name"] for r in rows for f in r["functions"]}


def test_split_is_stratified_seeded_and_leak_free_on_real_rows():
    rows = fixture_rows()
    train, test = split_rows(rows, test_per_category=3, seed=1)
    assert Counter(r["category"] for r in test) == {c: 3 for c in FILES}
    assert not offered(train) & offered(test)
    assert {r["id"] for r in train} | {r["id"] for r in test} == {r["id"] for r in rows}
    again = split_rows(rows, test_per_category=3, seed=1)
    assert [r["id"] for r in again[1]] == [r["id"] for r in test]
    other = split_rows(rows, test_per_category=3, seed=2)
    assert [r["id"] for r in other[1]] != [r["id"] for r in test]


def test_split_keeps_rows_sharing_a_function_together():
    # r0 and r1 share "f" through a distractor: they must land on the same side.
    rows = [row(0, "simple", fn("f")), row(1, "multiple", fn("g"), fn("f")), row(2, "simple", fn("h")),
            row(3, "multiple", fn("k")), row(4, "simple", fn("m")), row(5, "multiple", fn("n"))]
    for seed in range(10):
        train, test = split_rows(rows, test_per_category=1, seed=seed, test_categories=["simple", "multiple"])
        sides = {r["id"]: "test" for r in test} | {r["id"]: "train" for r in train}
        assert sides["r0"] == sides["r1"]
        assert not offered(train) & offered(test)


def test_strict_split_also_separates_near_duplicate_functions():
    rows = [row(0, "simple", fn("geo.distance", "a")), row(1, "simple", fn("GeoDistance", "z")),
            row(2, "simple", fn("area", "x", "y")), row(3, "simple", fn("volume", "x", "y")),
            row(4, "simple", fn("other", "q"))]
    groups = [sorted(rows[i]["id"] for i in g) for g in components(rows, strict=True)]
    assert ["r0", "r1"] in groups and ["r2", "r3"] in groups
    assert len(components(rows, strict=False)) == 5


def test_split_refuses_when_quota_cannot_be_met():
    rows = fixture_rows()
    with pytest.raises(DataError, match="lower split.test_per_category"):
        split_rows(rows, test_per_category=13, seed=0)


def test_held_out_category_split_trains_on_the_others():
    rows = fixture_rows()
    train, test = split_rows(rows, 4, seed=0, test_categories=["parallel_multiple"],
                                  train_categories=["simple", "multiple", "parallel"])
    assert {r["category"] for r in test} == {"parallel_multiple"}
    assert "parallel_multiple" not in {r["category"] for r in train}
    assert not offered(train) & offered(test)


# ---------------------------------------------------------------- extra sources (exec call strings)

COUNTER = {"name": "count", "parameters": {"type": "dict", "properties": {"numbers": {"type": "array"}}}}


@pytest.mark.parametrize("text, gold", [
    ("f(n=20, k=5, p=0.6)", {"f": {"n": [20], "k": [5], "p": [0.6]}}),  # keyword only
    ("f(x=-3, y=-2.5, z=+1)", {"f": {"x": [-3], "y": [-2.5], "z": [1]}}),  # negative numbers
    ("f(q='Paris, France (FR)', r=\"it's, \\\"quoted\\\"\")",  # commas, parentheses and quotes inside strings
     {"f": {"q": ["Paris, France (FR)"], "r": ['it\'s, "quoted"']}}),
    ("f(v=[0.5, [1, -2], (3, 4)], t=(45.42, -75.69), e=[])",  # nested lists; tuples become lists
     {"f": {"v": [[0.5, [1, -2], [3, 4]]], "t": [[45.42, -75.69]], "e": [[]]}}),
    ("f(d={'a': 1, 'b': {'c': [1, 2]}}, ds=[{'k': 'v'}, {'k': 'w'}])",  # dicts in BFCL's {key: [allowed]} form
     {"f": {"d": [{"a": [1], "b": [{"c": [[1, 2]]}]}], "ds": [[{"k": ["v"]}, {"k": ["w"]}]]}}),
    ("f(p=1/6, amount=500*500, flag=True, none=None)",  # arithmetic on numbers: the value the call receives
     {"f": {"p": [1 / 6], "amount": [250000], "flag": [True], "none": [None]}}),
    ("geo.distance(a=1)", {"geo.distance": {"a": [1]}}),  # a dotted name
    ("f()", {"f": {}}),
    ("count([1,3,4,6,8])", {"count": {"numbers": [[1, 3, 4, 6, 8]]}}),  # positional: the only parameter
])
def test_exec_call_strings_parse_into_possible_answers(text, gold):
    assert parse_call(text, [COUNTER], "x.json: row r") == gold


def test_parsed_exec_answers_give_back_the_calls_as_written():
    text = "f(d={'a': 1, 'b': {'c': [1, 2]}}, ds=[{'k': 'v'}], s='a, b', n=-1)"
    (gt,) = [parse_call(text, [], "x.json: row r")]
    assert gold_calls([gt]) == [{"name": "f", "arguments": {"d": {"a": 1, "b": {"c": [1, 2]}},
                                                                   "ds": [{"k": "v"}], "s": "a, b", "n": -1}}]


@pytest.mark.parametrize("text, why", [
    ("f(x=y)", "not a literal value: y"),
    ("f(x=g(1))", r"not a literal value: g\(1\)"),
    ("f(x='a' + 1)", r"not a literal value: 'a' \+ 1"),
    ("f(x={1, 2})", "not a literal value"),  # a set has no JSON form
    ("f(x={1: 'a'})", "dict keys must be strings"),
    ("f(x=1/0)", "division by zero"),
    ("f(1, 2)", "positional arguments need a function with exactly one parameter"),
    ("count(1, numbers=2)", "parameter numbers given twice"),
    ("f(*args)", "positional arguments"),
    ("f(**kw)", r"\*\*kw names no parameter"),
    ("x = 1", "invalid syntax"),
    ("[f(x=1)]", "not a function call"),
    ("f(x=1", "never closed|unexpected EOF"),
])
def test_exec_call_strings_that_cannot_be_read_are_refused_naming_the_row(text, why):
    with pytest.raises(DataError) as e:
        parse_call(text, [COUNTER], "BFCL_v4_exec_simple.json: row exec_simple_7")
    msg = str(e.value)
    assert msg.startswith(f"BFCL_v4_exec_simple.json: row exec_simple_7: cannot read the answer {text!r} as a call (")
    assert re.search(why, msg) and msg.endswith("fix that answer or leave its source out of data.extra_files")


DATA = section("data")
LIVE = section("split")["live_test"]


def fixture_extra():
    return read_extra("local", DATA["extra_files"], list(DATA["extra_files"]), local_dir=FIXTURE)


def test_extra_sources_are_normalized_like_the_paper_rows_and_carry_their_source():
    extra = fixture_extra()
    # 3 rows a source; live_multiple has a 4th, made to offer two of the paper's functions (the live test drops it).
    assert list(extra) == list(DATA["extra_files"])
    assert {name: len(rows) for name, rows in extra.items()} == {name: 4 if name == "live_multiple" else 3
                                                                  for name in extra}
    for name, rows in extra.items():
        for r in rows:
            assert list(r) == ["id", "category", "source", "messages", "functions", "ground_truth"]
            assert r["source"] == name and r["category"] == DATA["extra_files"][name]["category"]
            assert is_extra(r) and all(len(e) == 1 for e in r["ground_truth"])
    (positional,) = [r for r in extra["exec_parallel_multiple"] if r["id"] == "exec_parallel_multiple_18"]
    assert positional["ground_truth"][0] == {"calculate_mean": {"numbers": [[1, 3, 4, 6, 8]]}}
    assert not any(is_extra(r) for r in fixture_rows())


def keys(rows, strict=False):
    return {k for r in rows for fn in r["functions"] for k in function_keys(fn, strict)}


@pytest.mark.parametrize("seed", range(6))
def test_validation_and_extra_rows_keep_every_side_function_disjoint(seed):
    paper, extra = fixture_rows(), [r for rows in fixture_extra().values() for r in rows]
    train, valid, test, pool, dropped = split_study(paper, extra, 3, 2, seed)
    assert Counter(r["category"] for r in test) == {c: 3 for c in CATEGORIES}
    assert Counter(r["category"] for r in valid) == {c: 2 for c in CATEGORIES}
    assert not keys(train + pool) & keys(valid) and not keys(train + pool) & keys(test)
    assert not keys(valid) & keys(test)
    assert not any(is_extra(r) for r in train + valid + test)
    # Every extra row is in the pool, unless it offers a held-out function: then it is dropped.
    assert pool == [r for r in extra if r not in dropped]
    assert all(keys([r]) & keys(valid + test) for r in dropped)
    assert sorted(r["id"] for r in train + valid + test + pool + dropped) == sorted(r["id"] for r in paper + extra)
    # The test side is exactly the one drawn with neither a validation side nor extra rows.
    assert test == split_rows(paper, 3, seed)[1]
    assert split_study(paper, extra, 3, 2, seed) == (train, valid, test, pool, dropped)  # same seed, same split
    # data.extra's sources join the training side, in the pool's order; a source with no row there is refused.
    chosen = with_sources(train, pool, ["exec_simple", "live_simple"], "data.extra")
    assert chosen == train + [r for r in pool if r["source"] in ("exec_simple", "live_simple")]
    with pytest.raises(DataError, match=r"data.extra names \['live_complex'\], but no validated extra row"):
        with_sources(train, pool, ["live_complex"], "data.extra")


def test_an_extra_row_offering_a_test_function_is_dropped():
    paper = fixture_rows()
    extra = [r for name, rows in fixture_extra().items() if name not in LIVE for r in rows]  # the pool's sources
    # Seed 2 draws the fixture rows whose functions these two exec rows offer into test or validation.
    _, _, _, pool, dropped = split_study(paper, extra, 3, 2, seed=2)
    assert [r["id"] for r in dropped] == ["exec_simple_46", "exec_parallel_23"]
    assert len(pool) == len(extra) - 2


def test_a_validation_side_that_does_not_fit_is_refused():
    with pytest.raises(DataError, match="cannot fill the validation split.*lower split.valid_per_category"):
        split_sides(fixture_rows(), 3, 10, 0)


# The committed run's data/split/test.jsonl (dvc.lock), written before the extra
# sources and the validation side existed: the paper's test split must not move.
TEST_SPLIT_SHA256 = "4608ab53dc44395b471f91ecb5a2e88d60f8f36f986a3260dfdf1a4715ff7185"
WHEEL_COUNTS = {"live_simple": 258, "live_multiple": 1053, "live_parallel": 16, "live_parallel_multiple": 24,
                "exec_simple": 100, "exec_multiple": 50, "exec_parallel": 50, "exec_parallel_multiple": 40}


@pytest.fixture(scope="module")
def wheel_rows():
    """(paper rows, extra rows) of the pinned wheel, read as stage fetch_bfcl reads them (no skip: fetch fails loud)."""
    wheel = pip_wheel(DATA["wheel"], DATA["wheel_sha256"])
    raw = read_source("wheel", DATA["files"], wheel=wheel)
    paper = [r for cat, (q, a) in raw.items() for r in normalize(cat, q, a)]
    extra = read_extra("wheel", DATA["extra_files"], list(DATA["extra_files"]), wheel=wheel)
    return paper, extra


def test_default_test_split_is_byte_identical_with_extra_sources_and_validation(wheel_rows, tmp_path):
    paper, extra = wheel_rows
    assert {name: len(rows) for name, rows in extra.items()} == WHEEL_COUNTS  # every exec answer parses
    p = section("split")
    train, valid, test, pool, dropped = split_study(paper, [r for rows in extra.values() for r in rows],
                                                         p["test_per_category"], p["valid_per_category"], p["seed"],
                                                         p["train_per_category"])
    write_jsonl(tmp_path / "test.jsonl", test)
    assert sha256_file(tmp_path / "test.jsonl") == TEST_SPLIT_SHA256
    assert Counter(r["category"] for r in valid) == {c: p["valid_per_category"] for c in CATEGORIES}
    assert not keys(train + pool) & keys(valid + test) and not keys(valid) & keys(test)
    assert len(train) + len(valid) + len(test) == 1000 and len(pool) + len(dropped) == sum(WHEEL_COUNTS.values())


# ---------------------------------------------------------------- the live test (issue 32)


def run_split(tmp_path, data=(), split=()):
    """Stage split on the fixture data, 3 test and 2 validation rows a category, [data] and [split] updated."""
    from test_errors import SPLIT, bfcl_rows, stage, write_bfcl

    params = {"data": {**DATA, **dict(data)}, "split": {**SPLIT["split"], **dict(split)}}
    return stage("split", write_bfcl(tmp_path / "bfcl", bfcl_rows()), tmp_path / "split", tmp_path / "split.json",
                 cwd=tmp_path, params=params)


def test_the_split_stage_writes_a_live_test_no_training_or_validation_row_shares_a_function_with(tmp_path):
    proc = run_split(tmp_path, {"extra": ["exec_simple", "exec_multiple"]})  # data.extra's rows are training rows too
    assert proc.returncode == 0, proc.stderr[-2000:]
    sides = {name: read_jsonl(tmp_path / "split" / f"{name}.jsonl")
             for name in ("train", "valid", "test", "extra", "test_live")}
    live = [r for name in LIVE for r in fixture_extra()[name]]
    assert {r["source"] for r in sides["train"] if is_extra(r)} == {"exec_simple", "exec_multiple"}
    assert not any(r.get("source") in LIVE for name in ("train", "valid", "test", "extra") for r in sides[name])
    assert {r["source"] for r in sides["test_live"]} == set(LIVE)
    assert not keys(sides["test_live"]) & keys(sides["train"] + sides["valid"])
    # Every live row is in test_live unless it offers a training or validation function: the fixture's made-up
    # live_multiple row offers two of the paper's simple functions, one of them on the training side.
    dropped = [r for r in live if r not in sides["test_live"]]
    assert [r["id"] for r in dropped] == ["live_multiple_shares_paper_functions"]
    assert keys(dropped) & keys(sides["train"] + sides["valid"])
    assert sorted(sides["test_live"], key=lambda r: r["id"]) == sorted([r for r in live if r not in dropped],
                                                                     key=lambda r: r["id"])
    m = read_json(tmp_path / "split.json")
    assert m["test_live"] == {
        "n": len(live) - 1, "by_category": dict(Counter(r["category"] for r in sides["test_live"])), "n_in": len(live),
        "n_dropped": 1, "by_source": {name: {"n_in": len(fixture_extra()[name]),
                                             "n_kept": len(fixture_extra()[name]) - (name == "live_multiple")}
                                      for name in LIVE},
        "dropped": ["live_multiple_shares_paper_functions"]}
    assert {name: m[name]["n"] for name in sides} == {name: len(rows) for name, rows in sides.items()}
    assert set(m["extra"]["by_source"]) == set(DATA["extra_files"]) - set(LIVE)


def test_no_live_test_with_an_empty_live_test_list(tmp_path):
    proc = run_split(tmp_path, split={"live_test": []})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_jsonl(tmp_path / "split" / "test_live.jsonl") == []
    assert {r["source"] for r in read_jsonl(tmp_path / "split" / "extra.jsonl")} == set(DATA["extra_files"])
    assert read_json(tmp_path / "split.json")["test_live"]["n_in"] == 0


def test_a_live_source_in_both_the_live_test_and_data_extra_is_refused_naming_the_key(tmp_path):
    from test_errors import one_line_error

    msg = one_line_error(run_split(tmp_path, {"extra": ["exec_simple", "live_simple"]}), "split")
    assert msg == ("split: params.yaml data.extra=['exec_simple', 'live_simple'] trains on ['live_simple'], which "
                   "split.live_test tests on: a live test row is never a training row; remove them from data.extra "
                   "(or from split.live_test)")
    assert not (tmp_path / "split").exists() and not (tmp_path / "split.json").exists()


def test_no_live_test_row_shares_a_function_with_a_training_or_validation_row_of_the_real_split(wheel_rows):
    """The committed params' split of the pinned wheel, as stage split computes it (~0.5 s, the wheel cached)."""
    paper, extra = wheel_rows
    p = section("split")
    sides, drawn = study_sides(paper + [r for rows in extra.values() for r in rows], DATA["categories"],
                               DATA["extra"], p["live_test"], p["test_per_category"], p["valid_per_category"],
                               p["seed"], p["train_per_category"])
    assert sides["test_live"] and not keys(sides["test_live"]) & keys(sides["train"] + sides["valid"])
    assert {r["source"] for r in drawn["test_live"]} == set(LIVE) and not any(
        r.get("source") in LIVE for name in ("train", "valid", "test", "extra") for r in sides[name])
    # What params.yaml's split.live_test comment and metrics/split.json say: 86 of 1,351 dropped.
    kept = Counter(r["source"] for r in sides["test_live"])
    assert {name: (WHEEL_COUNTS[name], kept[name]) for name in LIVE} == {
        "live_simple": (258, 238), "live_multiple": (1053, 1002), "live_parallel": (16, 6),
        "live_parallel_multiple": (24, 19)}
    assert [r["id"] for r in sides["test"]] == [r["id"] for r in split_study(paper, [], p["test_per_category"],
                                                                              p["valid_per_category"], p["seed"])[2]]
