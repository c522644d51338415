"""The validated splits as a Hugging Face dataset (data/validated/dataset/): a parquet file per split, a card.

Arrow types every column strictly, and rows are not: function schemas have
different keys row to row and allowed-value lists mix types (``[10, ""]``),
which an inferred struct would fill with nulls or refuse. So ``messages`` is a
list of ``{role, content}`` strings and the schema-free ``functions`` and
``ground_truth`` are JSON text; ``source`` (extra rows only) is null elsewhere.
Decoded (``load_split``), a row is exactly what ``read_rows`` gives of the JSONL.
"""

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from toolcall.bfcl import CATEGORIES
from toolcall.bfcl.rows import check_rows, read_rows
from toolcall.errors import DataError
from toolcall.io import atomic_dir

# test_live: the second test set, BFCL's live_* rows (params split.live_test); absent with split.live_test [].
SPLITS = ("train", "valid", "test", "test_live")
COLUMNS = ("id", "category", "source", "messages", "functions", "ground_truth")  # a decoded row's key order
JSON_COLUMNS = ("functions", "ground_truth")
MESSAGE_KEYS = ("role", "content")
# Same rows, same bytes (with the pinned pyarrow): every option that shapes the file is fixed here.
PARQUET = dict(compression="zstd", compression_level=3, version="2.6", data_page_version="1.0",
               use_dictionary=True, write_statistics=True, row_group_size=10_000, store_schema=True)


def _datasets():
    # Local files only: never the Hub, whatever the environment says (read when datasets is first imported).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


def features():
    """The columns, as ``datasets`` types them (the card's ``dataset_info.features``)."""
    from datasets import Features, List, Value

    return Features({"id": Value("string"), "category": Value("string"), "source": Value("string"),
                     "messages": List({key: Value("string") for key in MESSAGE_KEYS}),
                     "functions": Value("string"), "ground_truth": Value("string")})


def _encode(where, row):
    unknown = [k for k in row if k not in COLUMNS]
    if unknown:
        raise DataError(f"{where} (id {row.get('id', '?')}): field(s) {', '.join(unknown)} have no column in the "
                        "dataset; add them to toolcall/bfcl/dataset.py or drop them")
    for m in row["messages"]:
        if not (isinstance(m, dict) and sorted(m) == sorted(MESSAGE_KEYS)
                and all(isinstance(v, str) for v in m.values())):
            raise DataError(f"{where} (id {row['id']}): a message is not {{role, content}} strings: {m!r}")
    return {"id": row["id"], "category": row["category"], "source": row.get("source"),
            "messages": [{key: m[key] for key in MESSAGE_KEYS} for m in row["messages"]],
            **{key: json.dumps(row[key], ensure_ascii=False) for key in JSON_COLUMNS}}


def write_dataset(out_dir, splits):
    """Write ``{split: rows}`` as ``<out_dir>/<split>.parquet`` and the card ``README.md``: all, or nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = features().arrow_schema  # carries the features as metadata: datasets reads them back as is
    tables = {}
    for split, rows in splits.items():
        check_rows(f"{split} split", rows)
        try:
            tables[split] = pa.Table.from_pylist([_encode(f"{split} split: row {n}", row)
                                                  for n, row in enumerate(rows, 1)], schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"{split} split: a row does not fit the dataset's columns ({e})") from None
    with atomic_dir(out_dir) as tmp:
        for split, table in tables.items():
            pq.write_table(table, tmp / f"{split}.parquet", **PARQUET)
        (tmp / "README.md").write_text(card(splits, {split: table.nbytes for split, table in tables.items()}))


def load_split(dataset_dir, split):
    """The rows of one split, read through ``datasets.load_dataset("parquet")``, as ``read_rows`` would return them.

    Refused, naming the file, if it is missing or unreadable, has other
    columns, or fails ``read_rows``' checks (every ``ROW_FIELDS``, unique
    ids, not empty). Nothing is left in any cache: the dataset is built in a
    temporary cache directory and kept in memory.
    """
    # Cost (700-row train split, 2 cores, load ~1): 38 ms vs 13 ms for read_rows of its JSONL (median of 5),
    # plus importing datasets once per process: 0.68 s alone, 0.36 s after mlx_lm (as in a stage).
    path = Path(dataset_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path} does not exist; run stage validate (dvc repro validate) or check the path")
    import pyarrow.parquet as pq

    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="toolcall-datasets-") as cache:
        try:  # (datasets cannot read a parquet file without rows: check_rows refuses those)
            ds = datasets.load_dataset("parquet", data_files={split: str(path)}, split=split, cache_dir=cache,
                                       keep_in_memory=True) if pq.read_metadata(path).num_rows else None
        except Exception as e:  # datasets wraps pyarrow's errors; the cause says what is wrong
            cause = e.__cause__ or e
            raise DataError(f"{path}: not a readable parquet split ({type(cause).__name__}: {cause}); "
                            "regenerate it (dvc repro validate)") from None
        if ds is not None and ds.features != features():
            raise DataError(f"{path}: columns {dict(ds.features)}, expected {dict(features())}; "
                            "regenerate it (dvc repro validate)")
        records = ds.to_list() if ds is not None else []
    return check_rows(path, [_decode(f"{path}: row {n}", rec) for n, rec in enumerate(records, 1)])


def _decode(where, rec):
    row = {}
    for key in COLUMNS:
        value = rec[key]
        if value is None:  # no source (the paper's rows); in another column, check_rows names it as missing
            continue
        if key in JSON_COLUMNS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} (id {rec['id']}): {key} is not valid JSON ({e.msg}); "
                                "regenerate the file (dvc repro validate)") from None
        row[key] = value
    return row


def read_split(path):
    """Rows of one split file: a dataset split (``<dir>/<split>.parquet``) or a JSONL file (the ablation splits)."""
    path = Path(path)
    return load_split(path.parent, path.stem) if path.suffix == ".parquet" else read_rows(path)


# ---------------------------------------------------------------- the card


def card(splits, num_bytes):
    """The card: YAML header (configs, features, split sizes: ``num_bytes`` in Arrow), what a row is, its origin."""
    header = {
        "license": "apache-2.0", "language": ["en"], "pretty_name": "BFCL v4 tool calling, function-disjoint splits",
        "task_categories": ["text-generation"], "tags": ["function-calling", "tool-calling", "bfcl"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"{s}.parquet"} for s in splits]}],
        "dataset_info": {"features": features()._to_yaml_list(),
                         "splits": [{"name": s, "num_bytes": num_bytes[s], "num_examples": len(rows)}
                                    for s, rows in splits.items()],
                         "dataset_size": sum(num_bytes.values())},
    }
    cats = list(CATEGORIES) + sorted({r["category"] for rows in splits.values() for r in rows} - set(CATEGORIES))
    counts = {s: Counter(r["category"] for r in rows) for s, rows in splits.items()}
    table = [f"| split | {' | '.join(cats)} | total | of them from other BFCL files |", "|---" * (len(cats) + 3) + "|"]
    table += [f"| {s} | {' | '.join(str(counts[s][c]) for c in cats)} | {len(rows)} | "
              f"{sum('source' in r for r in rows)} |" for s, rows in splits.items()]
    sources = sorted(Counter(r["source"] for rows in splits.values() for r in rows if "source" in r).items())
    return f"""---
{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---

# BFCL v4 tool calling: the validated splits

The training, validation and test rows this project fine-tunes and scores small
language models on, written by its `validate` stage (`data/validated/`, also as
JSONL beside this directory). `test_live`, where present, is a second test set:
BFCL's live files (real users' requests), none of them trained on.

## A row

| column | type | what |
|---|---|---|
| `id` | string | BFCL's id, e.g. `simple_python_0`; unique across the splits |
| `category` | string | the call pattern: `simple`, `multiple`, `parallel`, `parallel_multiple` |
| `source` | string or null | null for the paper's four BFCL files; else the extra BFCL file (e.g. `live_simple`) |
| `messages` | list of `{{role, content}}` | the conversation before the call (BFCL's first turn) |
| `functions` | string: JSON | the functions offered, BFCL's schemas as shipped (`"type": "dict"`, `"float"`, ...) |
| `ground_truth` | string: JSON | the gold calls, `[{{"fn.name": {{"param": [allowed values]}}}}]`; `""`: omittable |

`functions` and `ground_truth` are JSON text, not nested columns: schemas have
different keys from row to row and allowed-value lists mix types, which Arrow
cannot type as one struct without filling in nulls. Decode them with
`json.loads`; `toolcall.bfcl.dataset.load_split(dir, split)` returns the rows
decoded, exactly as in the JSONL files.

## Where it comes from

[BFCL v4](https://github.com/ShishirPatil/gorilla/tree/main/berkeley-function-call-leaderboard)
(the Berkeley Function Calling Leaderboard, Apache-2.0), its `simple_python`,
`multiple`, `parallel` and `parallel_multiple` files{
    "; rows of other BFCL files: " + ", ".join(f"`{s}` ({n})" for s, n in sources) if sources else ""}. The split is
function-disjoint: rows that offer a function of the same name stay on one side,
so no test or validation function is seen in training, and the live test holds
no row that offers a training or validation function. Training, validation and
live test rows that do not fit the model's chat template (or its length limit)
were dropped (`metrics/validate.json` says which and why); the test split is complete.

## Rows per split and category

{chr(10).join(table)}
"""
