"""BFCL data: fetch, normalize, split.

A normalized row (one JSON line in ``data/bfcl/<category>.jsonl``)::

    {"id": "simple_python_0", "category": "simple",
     "messages": [{"role": "user", "content": "..."}],
     "functions": [<BFCL schema>, ...],
     "ground_truth": [{"fn.name": {"param": [allowed values]}}]}

Schemas and answers are kept exactly as BFCL ships them: the scorer needs the
original types ("dict", "float", "tuple", "any"); only the prompt maps them to
JSON Schema names.
"""

import copy
import random
import re
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

from .errors import DataError
from .io import parse_jsonl, read_jsonl

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")


# ---------------------------------------------------------------- fetching


def _parse_lines(text, where):
    return parse_jsonl(text, where, "the file is truncated or corrupt: fetch it again (data.source) or fix that line")


def read_source(source, files, *, wheel=None, local_dir=None, hub_repo=None, hub_revision=None):
    """Return ``{category: (question_rows, answer_rows)}`` from one source.

    ``files`` maps each category to its BFCL file name; answers live under
    ``possible_answer/`` with the same name in every source.
    """
    def load(name):
        if source == "wheel":
            member = f"bfcl_eval/data/{name}"
            with zipfile.ZipFile(wheel) as zf:
                try:
                    return _parse_lines(zf.read(member).decode(), f"{Path(wheel).name}:{member}")
                except KeyError:
                    raise DataError(f"{member} is not in {Path(wheel).name}") from None
        if source == "local":
            path = Path(local_dir) / name
            if not path.exists():
                raise DataError(f"{path} does not exist (data.local_dir={local_dir}); put the BFCL files there or fix data.local_dir")
            return _parse_lines(path.read_text(), str(path))
        if source == "hub":
            # Raw files rather than `datasets.load_dataset`: the schemas' nested
            # `properties` differ per row and Arrow's inferred struct would fill
            # them with nulls, silently changing the data.
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(hub_repo, name, repo_type="dataset", revision=hub_revision)
            return _parse_lines(Path(path).read_text(), f"{hub_repo}:{name}")
        raise DataError(f"unknown data.source {source!r}: expected wheel, local or hub")

    return {cat: (load(name), load(f"possible_answer/{name}")) for cat, name in files.items()}


def normalize(category, questions, answers, where=""):
    """Join BFCL questions with their answers into normalized rows."""
    if category not in CATEGORIES:
        raise DataError(f"unknown category {category!r}: expected one of {CATEGORIES}")
    by_id = {}
    for a in answers:
        if "id" not in a or "ground_truth" not in a:
            raise DataError(f"{where}: answer row lacks id or ground_truth: {str(a)[:120]}")
        by_id[a["id"]] = a["ground_truth"]
    rows = []
    for q in questions:
        qid = q.get("id", "?")
        missing = [k for k in ("id", "question", "function") if k not in q]
        if missing:
            raise DataError(f"{where}: row {qid} lacks {missing}")
        if qid not in by_id:
            raise DataError(f"{where}: row {qid} has no possible answer")
        turns = q["question"]
        if not (isinstance(turns, list) and turns and isinstance(turns[0], list)):
            raise DataError(f"{where}: row {qid}: question must be a list of turns")
        # These four categories are single-turn: the first turn is the prompt.
        rows.append(
            {
                "id": qid,
                "category": category,
                "messages": turns[0],
                "functions": q["function"],
                "ground_truth": by_id[qid],
            }
        )
    return rows


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


# ---------------------------------------------------------------- splitting


def normalized_name(name):
    """Function name without case and separators: ``geo.distance`` ~ ``GeoDistance``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def function_keys(fn, strict=False):
    """Keys that tie rows together: the name, and in strict mode near-duplicates too."""
    keys = [("name", fn["name"])]
    if strict:
        keys.append(("norm", normalized_name(fn["name"])))
        # ... and without its namespace: ``math.factorial`` ~ ``factorial``.
        keys.append(("norm", normalized_name(fn["name"].rsplit(".", 1)[-1])))
        props = fn.get("parameters", {}).get("properties", {})
        if props:
            keys.append(("params", tuple(sorted(props))))
    return keys


def components(rows, strict=False):
    """Group rows that share any offered function (union-find over function keys)."""
    parent = {}

    def find(x):
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for i, row in enumerate(rows):
        for fn in row["functions"]:
            for key in function_keys(fn, strict):
                parent[find(key)] = find(("row", i))
    groups = defaultdict(list)
    for i in range(len(rows)):
        groups[find(("row", i))].append(i)
    return sorted(groups.values())


def split_rows(rows, test_per_category, seed, train_per_category=None, strict=False,
               test_categories=CATEGORIES, train_categories=CATEGORIES):
    """Seeded train/test split, stratified by category, with no function leakage.

    Whole components (rows linked by a shared function) go to one side, so no
    function offered in a test row is offered in any training row. Components
    are taken in a seeded random order while they fit the per-category test
    quota. ``test_categories`` / ``train_categories`` restrict each side (the
    unseen-pattern ablation tests on one category and trains on the others).
    """
    rng = random.Random(seed)
    groups = components(rows, strict)
    rng.shuffle(groups)
    quota = {c: test_per_category for c in test_categories}
    test, rest = [], []
    for group in groups:
        counts = Counter(rows[i]["category"] for i in group)
        if all(counts[c] <= quota.get(c, 0) for c in counts):
            test += group
            for c in counts:
                quota[c] -= counts[c]
        else:
            rest += group
    short = {c: q for c, q in quota.items() if q > 0}
    if short:
        raise DataError(
            f"cannot fill the test split without leakage; short by {short}: "
            "lower split.test_per_category"
        )
    by_cat = defaultdict(list)
    for i in sorted(rest):
        if rows[i]["category"] in train_categories:
            by_cat[rows[i]["category"]].append(i)
    train = []
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        rng.shuffle(idx)
        train += idx[:train_per_category] if train_per_category else idx
    return [rows[i] for i in sorted(train)], [rows[i] for i in sorted(test)]


ROW_FIELDS = ("id", "category", "messages", "functions", "ground_truth")


def read_rows(*paths):
    """Normalized rows from JSONL files, refused unless every row is usable as a row.

    Each row must have every field of ``ROW_FIELDS``, ids must be unique across
    the files, and no file may be empty: a row lost or doubled here would
    silently change what is trained or tested on.
    """
    rows, first_seen = [], {}
    for path in paths:
        file_rows = read_jsonl(path)
        if not file_rows:
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
        rows += file_rows
    return rows


def load_categories(data_dir, categories=CATEGORIES):
    return read_rows(*(Path(data_dir) / f"{cat}.jsonl" for cat in categories))
