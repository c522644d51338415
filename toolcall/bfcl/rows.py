"""Normalized rows: reading them strictly, their gold calls, their source."""

import copy
from pathlib import Path

from toolcall.bfcl import CATEGORIES
from toolcall.errors import DataError
from toolcall.io import read_jsonl

# ---------------------------------------------------------------- gold calls


def gold_calls(ground_truth):
    """The canonical gold calls: each parameter takes its first allowed value.

    Parameters whose only allowed value is ``""`` (may be omitted) are left
    out. Dict answers are themselves ``{key: [allowed values]}`` (also inside
    lists of dicts) and are resolved the same way, key by key. This is what
    SFT trains on and what validation round-trips.
    """

    def first(allowed):
        return [v for v in allowed if v != ""][:1]

    def resolve(value):
        if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
            return {k: resolve(v) for k, allowed in value.items() for v in first(allowed)}
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return [resolve(v) for v in value]
        return copy.deepcopy(value)

    calls = []
    for entry in ground_truth:
        ((name, params),) = entry.items()
        calls.append({"name": name, "arguments": {p: resolve(v) for p, allowed in params.items() for v in first(allowed)}})
    return calls


def is_extra(row):
    """Whether a row comes from another BFCL file (``data.extra_files``: an extra training source, or a source
    of the live test, ``split.live_test``), not the paper's four files."""
    return "source" in row



ROW_FIELDS = ("id", "category", "messages", "functions", "ground_truth")


def read_rows(*paths, allow_empty=False):
    """Normalized rows from JSONL files, refused unless every row is usable as a row.

    Each row must have every field of ``ROW_FIELDS``, ids must be unique across
    the files, and no file may be empty (unless ``allow_empty``: the extra
    pool with ``data.extra_files: {}``): a row lost or doubled here would
    silently change what is trained or tested on.
    """
    rows, first_seen = [], {}
    for path in paths:
        rows += check_rows(path, read_jsonl(path), first_seen, allow_empty)
    return rows


def check_rows(path, file_rows, first_seen=None, allow_empty=False):
    """``file_rows`` (read from ``path``) if every one is usable as a row (``read_rows``' checks), else a ``DataError``.

    ``first_seen`` maps the ids of files read before to where they were: ids
    must be unique across them too.
    """
    first_seen = {} if first_seen is None else first_seen
    if not file_rows and not allow_empty:
        raise DataError(f"{path}: no rows; rerun the stage that writes it (dvc repro) or fix its params")
    for n, row in enumerate(file_rows, 1):
        where = f"{path}: row {n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: not a JSON object; fix or regenerate the file (dvc repro)")
        missing = [k for k in ROW_FIELDS if k not in row]
        if missing:
            raise DataError(f"{where} (id {row.get('id', '?')}) lacks {', '.join(missing)}; "
                            "fix or regenerate the file (dvc repro)")
        if row["id"] in first_seen:
            raise DataError(f"{where}: duplicate id {row['id']} (first in {first_seen[row['id']]}); "
                            "ids must be unique: remove or rename one")
        first_seen[row["id"]] = where
    return file_rows


def load_categories(data_dir, categories=CATEGORIES, extra=()):
    """``data_dir``'s rows of ``categories`` (``<category>.jsonl``) then of the ``extra`` sources
    (``extra/<name>.jsonl``), as ``fetch_bfcl`` writes them; ids unique across all."""
    return read_rows(*(Path(data_dir) / f"{cat}.jsonl" for cat in categories),
                     *(Path(data_dir) / "extra" / f"{name}.jsonl" for name in extra))
