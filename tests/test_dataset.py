"""The validated splits as a Hugging Face dataset (toolcall/bfcl/dataset.py): round trip, bytes, card, errors."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from configs import section
from toolcall.bfcl.dataset import SPLITS, load_split, read_split, write_dataset
from toolcall.bfcl.rows import read_rows
from toolcall.bfcl.sources import normalize, read_extra, read_source
from toolcall.errors import DataError
from toolcall.io import jsonl_text, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bfcl"
DATA = section("data")


def fixture_splits():
    """Paper rows and extra rows (with ``source``: the live test's in test_live), and two rows as heterogeneous
    as BFCL's get."""
    raw = read_source("local", DATA["files"], local_dir=FIXTURE)
    paper = [r for cat, (q, a) in raw.items() for r in normalize(cat, q, a)]
    extra = [r for rows in read_extra("local", DATA["extra_files"], list(DATA["extra_files"]),
                                      local_dir=FIXTURE).values() for r in rows]
    live = [r for r in extra if r["source"] in section("split")["live_test"]]
    odd = copy.deepcopy(paper[0])
    odd.update(id="odd_0", messages=[{"role": "system", "content": "Ünïcode ✓"}, {"role": "user", "content": ""}],
               functions=[{"name": "f", "parameters": {"type": "dict", "properties": {
                   "x": {"type": "float", "enum": [1.5, "a", None], "default": 1e-300}}}}],
               ground_truth=[{"f": {"x": [0.1, 2, "", [1, [2]], {"k": [True]}], "y": [{}]}}])
    assert len(paper) >= 6 and live and len(live) < len(extra)
    return {"train": paper[4:] + [r for r in extra if r not in live], "valid": paper[2:4], "test": paper[:2] + [odd],
            "test_live": live}


def card_header(dataset_dir):
    text = (Path(dataset_dir) / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    splits = fixture_splits()
    out = tmp_path_factory.mktemp("validated") / "dataset"
    write_dataset(out, splits)
    return splits, out


def test_rows_come_back_exactly_through_load_dataset(written, tmp_path):
    splits, out = written
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "test.parquet", "test_live.parquet", "train.parquet",
                                                     "valid.parquet"]
    for split, rows in splits.items():
        ds = datasets.load_dataset("parquet", data_files={split: str(out / f"{split}.parquet")}, split=split,
                                   cache_dir=str(tmp_path / "cache"), keep_in_memory=True)
        assert ds.num_rows == len(rows) and ds["id"] == [r["id"] for r in rows]
        assert ds["source"] == [r.get("source") for r in rows]
        back = load_split(out, split)
        assert back == rows
        assert jsonl_text(back) == jsonl_text(rows)  # key order too: the same JSONL bytes
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
        assert read_split(out / f"{split}.parquet") == read_split(tmp_path / f"{split}.jsonl") == read_rows(
            tmp_path / f"{split}.jsonl")
    assert any("source" in r for r in splits["train"]) and not any("source" in r for r in splits["test"])


def test_loading_leaves_no_cache_behind(written, tmp_path, monkeypatch):
    _, out = written
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read once: read it again
    load_split(out, "valid")
    assert list(tmp_path.iterdir()) == []


def test_same_rows_same_bytes_in_a_fresh_process(written, tmp_path):
    splits, out = written
    write_dataset(tmp_path / "again", splits)
    # A fresh process with another hash seed: nothing may depend on set or dict order of this one.
    code = ("import sys; sys.path.insert(0, 'tests'); from test_dataset import fixture_splits; "
            "from toolcall.bfcl.dataset import write_dataset; write_dataset(sys.argv[1], fixture_splits())")
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], cwd=ROOT, env=env, check=True)
    for again in (tmp_path / "again", tmp_path / "fresh"):
        assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in out.iterdir())
        for f in out.iterdir():
            assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_the_card_describes_the_parquet_files(written, tmp_path):
    splits, out = written
    header = card_header(out)
    card_features = datasets.Features._from_yaml_list(header["dataset_info"]["features"])
    for split in SPLITS:
        assert datasets.Features.from_arrow_schema(pq.read_schema(out / f"{split}.parquet")) == card_features
    (config,) = header["configs"]
    assert config["data_files"] == [{"split": s, "path": f"{s}.parquet"} for s in SPLITS]
    assert [(s["name"], s["num_examples"]) for s in header["dataset_info"]["splits"]] == [
        (s, len(rows)) for s, rows in splits.items()]
    assert header["license"] == "apache-2.0"
    # The directory loads as a dataset on its own, from the card: its splits, sizes and features.
    whole = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert list(whole) == list(SPLITS)
    for split, rows in splits.items():
        assert whole[split].num_rows == len(rows) and whole[split].features == card_features
    text = (out / "README.md").read_text()
    for words in ("BFCL v4", "Apache-2.0", "function-disjoint", "json.loads",
                  "| test | 3 | 0 | 0 | 0 | 3 | 0 |"):
        assert words in text, words


def test_missing_corrupt_or_foreign_files_are_refused_naming_them(written, tmp_path):
    _, out = written
    with pytest.raises(DataError, match=rf"^{tmp_path}/nowhere/test.parquet does not exist; run stage validate"):
        load_split(tmp_path / "nowhere", "test")
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (out / "train.parquet").read_bytes()
    (bad / "train.parquet").write_bytes(data[: len(data) // 2])  # truncated
    (bad / "valid.parquet").write_bytes(b"not parquet at all")
    for split in ("train", "valid"):
        with pytest.raises(DataError, match=rf"^{bad}/{split}.parquet: not a readable parquet split \(.+\); "
                                            r"regenerate it \(dvc repro validate\)$"):
            load_split(bad, split)
    pq.write_table(pq.read_table(out / "test.parquet").drop_columns(["source"]), bad / "test.parquet")
    with pytest.raises(DataError, match=rf"^{bad}/test.parquet: columns .+, expected .+; regenerate it"):
        load_split(bad, "test")


def test_rows_read_rows_would_refuse_are_refused_both_ways(written, tmp_path):
    splits, out = written
    valid = splits["valid"]
    with pytest.raises(DataError, match=r"^valid split: row 3: duplicate id"):
        write_dataset(tmp_path / "ds", {"valid": valid + [dict(valid[0])]})
    with pytest.raises(DataError, match=r"^valid split: no rows"):
        write_dataset(tmp_path / "ds", {"valid": []})
    # Files not written by write_dataset: a doubled row, no rows, a null id.
    table = pq.read_table(out / "valid.parquet")
    (tmp_path / "ds").mkdir()
    for table, why in ((pa.concat_tables([table, table.slice(0, 1)]), r"row 3: duplicate id"),
                       (table.slice(0, 0), "no rows"),
                       (table.set_column(0, "id", pa.array([None, "x"], pa.string())), r"row 1 \(id \?\) lacks id")):
        pq.write_table(table, tmp_path / "ds" / "valid.parquet")
        with pytest.raises(DataError, match=rf"^{tmp_path}/ds/valid.parquet: {why}"):
            load_split(tmp_path / "ds", "valid")


def test_a_row_the_columns_cannot_hold_writes_nothing(tmp_path):
    rows = fixture_splits()["valid"]
    out = tmp_path / "dataset"
    write_dataset(out, {"valid": rows})
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    for bad, why in ((dict(rows[0], note="x"), r"field\(s\) note have no column"),
                     (dict(rows[0], messages=[{"role": "user", "content": "q", "name": "n"}]), "a message is not"),
                     (dict(rows[0], id=7), "does not fit the dataset's columns")):
        with pytest.raises(DataError, match=why):
            write_dataset(out, {"valid": [rows[1], bad]})
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]  # no temporary left beside it


def test_validate_stage_writes_the_dataset_beside_the_jsonl(tmp_path):
    from test_errors import split_files, stage
    from tiny_model import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny")
    split_files(tmp_path / "split")
    params = {"validate": {**section("validate"), "max_seq_len": 4096, "live_max_seq_len": 4096}}
    proc = stage("validate", tmp_path / "split", tmp_path / "split.json", tiny, tmp_path / "validated",
                 tmp_path / "validate.json", cwd=tmp_path, params=params)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for split in SPLITS:
        rows = read_jsonl(tmp_path / "validated" / f"{split}.jsonl")
        assert rows and load_split(tmp_path / "validated" / "dataset", split) == rows
    assert card_header(tmp_path / "validated" / "dataset")["dataset_info"]["splits"][0]["name"] == "train"
    # The live test is validated like the training side, and its metrics carry the split's drops too.
    live = read_jsonl(tmp_path / "split" / "test_live.jsonl")
    metrics = json.loads((tmp_path / "validate.json").read_text())["test_live"]
    assert metrics["n_in"] == len(live) and set(metrics["by_source"]) == set(section("split")["live_test"])
    assert metrics["split_dropped"] == {"n_dropped": 0, "by_source": {s: 0 for s in section("split")["live_test"]}}
    # split.live_test: []: an empty live test, and no parquet file for it.
    write_jsonl(tmp_path / "split" / "test_live.jsonl", [])
    (tmp_path / "split.json").write_text('{"test_live": {"n_dropped": 0, "by_source": {}}}')
    proc = stage("validate", tmp_path / "split", tmp_path / "split.json", tiny, tmp_path / "validated",
                 tmp_path / "validate.json", cwd=tmp_path, params=params)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_jsonl(tmp_path / "validated" / "test_live.jsonl") == []
    assert not (tmp_path / "validated" / "dataset" / "test_live.parquet").exists()
