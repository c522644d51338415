"""Rows composed from the training side (toolcall/bfcl/compose.py, stage compose): seeded, training functions
only, gold that passes the scorer and the template round trip, call counts in the params' shares, outputs
written together or not at all, and joining the training side in validate only with compose.use."""

import json
import re
from collections import Counter

import pytest

from configs import config, section
from test_data import fixture_rows
from test_errors import bfcl_rows, leftovers, one_line_error, stage, write_bfcl
from tiny_model import make_tiny_model
from toolcall.bfcl.compose import compose, plan_calls
from toolcall.bfcl.dataset import load_split, write_dataset
from toolcall.bfcl.rows import ROW_FIELDS, gold_calls
from toolcall.bfcl.split import split_sides
from toolcall.bfcl.validate import row_problem
from toolcall.calls.prompts import PromptFormat
from toolcall.calls.scoring import check
from toolcall.config import ComposeConfig, ConfigError, from_params
from toolcall.errors import DataError
from toolcall.io import jsonl_text, read_json, read_jsonl, write_jsonl

MAX_LEN = 4096  # the tiny byte-level tokenizer makes long sequences (as tests/pipeline_repo.py)
SMALL = {"n_parallel": 12, "n_parallel_multiple": 12, "n_multiple": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def fmt(tiny):
    from mlx_lm.utils import load_tokenizer

    return PromptFormat(load_tokenizer(tiny))


@pytest.fixture(scope="module")
def sides():
    """The fixture rows' training side, and the validation and test rows together."""
    train, valid, test = split_sides(fixture_rows(), 3, 2, seed=0)
    return train, valid + test


def params(**overrides):
    return config(ComposeConfig, "compose", **{**SMALL, **overrides})


def checked(fmt, max_len=MAX_LEN):
    return lambda row: row_problem(row, fmt, max_len)[0]


@pytest.fixture(scope="module")
def composed(sides, fmt):
    return compose(sides[0], params(), checked(fmt))


def test_same_seed_same_bytes_other_seed_other_rows(sides, fmt, composed):
    rows, metrics = composed
    again, metrics_again = compose(sides[0], params(), checked(fmt))
    assert jsonl_text(again) == jsonl_text(rows) and metrics_again == metrics
    other, _ = compose(sides[0], params(seed=1), checked(fmt))
    assert jsonl_text(other) != jsonl_text(rows)


def test_rows_are_normalized_tagged_and_fit_the_dataset(composed, sides, tmp_path):
    rows, metrics = composed
    assert Counter(r["category"] for r in rows) == {"parallel": 12, "parallel_multiple": 12, "multiple": 8}
    assert metrics["n"] == len(rows) == 32
    for row in rows:
        assert set(row) == {*ROW_FIELDS, "source"} and row["source"] == f"composed_{row['category']}"
    assert len({r["id"] for r in rows}) == len(rows)
    assert not {r["id"] for r in rows} & {r["id"] for r in sides[0]}
    # what validate writes when compose.use: the training side with them, read back unchanged
    write_dataset(tmp_path / "dataset", {"train": sides[0] + rows})
    assert load_split(tmp_path / "dataset", "train") == sides[0] + rows


def test_only_training_functions_are_offered(composed, sides):
    rows, _ = composed
    train, held_out = sides
    schemas = [fn for row in train for fn in row["functions"]]
    held_out_names = {fn["name"] for row in held_out for fn in row["functions"]}
    for row in rows:
        for fn in row["functions"]:
            assert fn in schemas, (row["id"], fn["name"])
            assert fn["name"] not in held_out_names, row["id"]


def test_every_gold_passes_the_checker_and_the_template(composed, fmt):
    rows, _ = composed
    for row in rows:
        calls = gold_calls(row["ground_truth"])
        assert check(row["functions"], calls, row["ground_truth"], row["category"]).valid, row["id"]
        assert row_problem(row, fmt, MAX_LEN)[0] is None, row["id"]
        names = [call["name"] for call in calls]
        offered = [fn["name"] for fn in row["functions"]]
        if row["category"] == "parallel":  # one function, called with one argument's value listed
            assert len(calls) >= 2 and offered == [names[0]] and set(names) == {names[0]}
            varied = [k for k in calls[0]["arguments"] if len({json.dumps(c["arguments"][k]) for c in calls}) > 1]
            assert len(varied) == 1, row["id"]
            question = row["messages"][0]["content"].lower()
            for call in calls:  # each listed value is in the question
                value = call["arguments"][varied[0]]
                forms = [str(value)] + ([str(int(value))] if isinstance(value, float) and value.is_integer() else [])
                assert any(re.search(rf"(?<![\w.]){re.escape(f.lower())}(?!\w)", question) for f in forms), row["id"]
        elif row["category"] == "parallel_multiple":  # 2-3 functions, each called
            assert 2 <= len(set(names)) <= 3 and sorted(offered) == sorted(set(names)) and len(calls) >= 2
        else:  # one call, 2-4 functions offered
            assert len(calls) == 1 and 2 <= len(offered) <= 4 and names[0] in offered


def test_call_counts_follow_the_params(sides, fmt):
    assert plan_calls(10, [1, 2, 2]) == [2] * 2 + [3] * 4 + [4] * 4
    assert Counter(plan_calls(7, [1, 1, 1])) == {2: 3, 3: 2, 4: 2}  # largest remainder, ties to fewer calls
    assert plan_calls(5, [0, 0, 1]) == [4] * 5
    rows, metrics = compose(sides[0], params(n_parallel=10, n_parallel_multiple=10, call_weights=[1, 2, 2]),
                            checked(fmt))
    for kind in ("parallel", "parallel_multiple"):
        hist = Counter(len(r["ground_truth"]) for r in rows if r["category"] == kind)
        assert hist == {2: 2, 3: 4, 4: 4}
        assert metrics["by_kind"][kind]["calls"] == {"2": 2, "3": 4, "4": 4}
    assert metrics["calls"] == {"1": 8, "2": 4, "3": 8, "4": 8}
    rows, _ = compose(sides[0], params(call_weights=[0, 0, 1]), checked(fmt))
    assert {len(r["ground_truth"]) for r in rows if r["category"] != "multiple"} == {4}


def test_failing_rows_are_dropped_counted_and_drawn_again(sides, fmt, composed):
    rows, _ = composed
    seen = []

    def every_third_fails(row):  # the real check, and every third row it passes refused too
        if reason := checked(fmt)(row):
            return reason
        seen.append(row["id"])
        return "test:third" if len(seen) % 3 == 0 else None

    kept, metrics = compose(sides[0], params(), every_third_fails)
    assert Counter(r["category"] for r in kept) == Counter(r["category"] for r in rows)
    refused = sum(m["dropped"].get("test:third", 0) for m in metrics["by_kind"].values())
    assert refused == len(seen) // 3 > 0 and metrics["n_dropped"] >= refused
    assert len(seen) == len(kept) + refused


def test_a_row_that_cannot_be_composed_names_the_key(sides):
    with pytest.raises(DataError, match=r"compose\.n_parallel=12: no new parallel row .* lower compose\.n_parallel"):
        compose(sides[0], params(), lambda row: "always:bad")
    no_singles = [r for r in sides[0] if len(r["ground_truth"]) > 1]
    with pytest.raises(DataError, match=r"compose\.n_multiple=8, but no training row has a single call"):
        compose(no_singles, params(n_parallel=0, n_parallel_multiple=0), lambda row: None)


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1], ["a"], [True, 1]])
def test_call_weights_are_checked(weights):
    with pytest.raises(ConfigError, match=r"\[compose\]: call_weights="):
        from_params(ComposeConfig, {**section("compose"), "call_weights": weights}, "compose")


def test_the_stage_writes_both_outputs_or_neither(tmp_path, sides, tiny):
    write_jsonl(tmp_path / "train.jsonl", sides[0])
    run = {"compose": {**section("compose"), **SMALL}, "validate": {**section("validate"), "max_seq_len": MAX_LEN}}
    out, metrics = tmp_path / "out" / "composed.jsonl", tmp_path / "metrics" / "compose.json"
    proc = stage("compose", "train.jsonl", tiny, out, metrics, cwd=tmp_path, params=run)
    assert proc.returncode == 0, proc.stderr
    rows, written = read_jsonl(out), read_json(metrics)
    assert written["n"] == len(rows) == 32 and written["by_kind"]["parallel"]["n"] == 12
    before = out.read_bytes()
    # Another seed would write other rows, but the metrics cannot be written: neither file changes.
    (tmp_path / "blocked").write_text("a file where the metrics' directory should be")
    proc = stage("compose", "train.jsonl", tiny, out, tmp_path / "blocked" / "compose.json", cwd=tmp_path,
                 params={**run, "compose": {**run["compose"], "seed": 1}})
    assert "compose: cannot write" in one_line_error(proc, "compose")
    assert out.read_bytes() == before and leftovers(out.parent) == []


def test_validate_joins_the_composed_rows_only_with_compose_use(tmp_path, tiny):
    bfcl = write_bfcl(tmp_path / "bfcl", bfcl_rows())
    base = {"split": {**section("split"), "test_per_category": 3, "valid_per_category": 2},
            "validate": {**section("validate"), "max_seq_len": MAX_LEN}, "compose": {**section("compose"), **SMALL}}
    assert stage("split", bfcl, "split", "split.json", cwd=tmp_path, params=base).returncode == 0
    proc = stage("compose", "split/train.jsonl", tiny, "composed.jsonl", "compose.json", cwd=tmp_path, params=base)
    assert proc.returncode == 0, proc.stderr
    train = {}
    for use in (False, True):
        run = {**base, "compose": {**base["compose"], "use": use}}
        proc = stage("validate", "split", "split.json", tiny, f"validated_{use}", f"validate_{use}.json",
                     "--composed", "composed.jsonl", cwd=tmp_path, params=run)
        assert proc.returncode == 0, proc.stderr
        train[use] = load_split(tmp_path / f"validated_{use}" / "dataset", "train")
        by_source = read_json(tmp_path / f"validate_{use}.json")["train"]["by_source"]
        if use:  # each kind counted as a source of its own, none dropped
            assert {s: (c["n_in"], c["n_kept"]) for s, c in by_source.items() if s.startswith("composed_")} == {
                "composed_parallel": (12, 12), "composed_parallel_multiple": (12, 12), "composed_multiple": (8, 8)}
        else:
            assert not any(s.startswith("composed_") for s in by_source)
    assert train[True] == train[False] + read_jsonl(tmp_path / "composed.jsonl")
    proc = stage("validate", "split", "split.json", tiny, "validated_none", "validate_none.json", cwd=tmp_path,
                 params={**base, "compose": {**base["compose"], "use": True}})
    assert "compose.use: false" in one_line_error(proc, "validate") and not (tmp_path / "validated_none").exists()
