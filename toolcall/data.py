"""BFCL data: fetch, normalize, split.

A normalized row (one JSON line in ``data/bfcl/<category>.jsonl``)::

    {"id": "simple_python_0", "category": "simple",
     "messages": [{"role": "user", "content": "..."}],
     "functions": [<BFCL schema>, ...],
     "ground_truth": [{"fn.name": {"param": [allowed values]}}]}

Schemas and answers are kept exactly as BFCL ships them: the scorer needs the
original types ("dict", "float", "tuple", "any"); only the prompt maps them to
JSON Schema names.

Rows of an extra training source (params ``data.extra_files``: BFCL's live_*
files and the exec_* files under ``unused_datasets/``) are normalized the same way,
with ``category`` the call pattern their answers follow (what the scorer
needs) and one more field, ``"source": "<name>"``; the paper's four files'
rows carry no ``source``, so they are byte for byte what they were before
extra sources existed. Extra rows only ever join the training side: the
sources of ``data.extra`` in the main study, others in its ablation arms.
"""

import ast
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
    """Return ``{key: (question_rows, answer_rows)}`` from one source.

    ``files`` maps each key (a category, or an extra source's name) to its
    BFCL file name, whose answers live under ``possible_answer/`` with the same
    name, or to a ``(questions, answers)`` pair of paths (the exec files keep
    theirs under ``unused_datasets/question/`` and ``.../possible_answer/``).
    Paths are relative to the data directory (``bfcl_eval/data/`` in the wheel).
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

    def pair(name):
        return (name, f"possible_answer/{name}") if isinstance(name, str) else tuple(name)

    return {key: tuple(load(path) for path in pair(name)) for key, name in files.items()}


def normalize(category, questions, answers, where="", source=None):
    """Join BFCL questions with their answers into normalized rows.

    ``source`` names an extra training source: its rows carry it as
    ``"source"``. Answers given as Python call strings (the exec files) are
    parsed into the possible-answer format (``parse_call``).
    """
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
        gt = by_id[qid]
        if isinstance(gt, list) and gt and all(isinstance(e, str) for e in gt):
            gt = [parse_call(text, q["function"], f"{where}: row {qid}") for text in gt]
        # These categories are single-turn: the first turn is the prompt.
        rows.append({"id": qid, "category": category, **({} if source is None else {"source": source}),
                     "messages": turns[0], "functions": q["function"], "ground_truth": gt})
    return rows


def read_extra(source, extra_files, names, **source_kw):
    """``{name: rows}`` of the extra training sources ``names`` (params ``data.extra_files``), each normalized
    with the category and files ``extra_files`` gives it; ``source_kw`` as for ``read_source``."""
    specs = {name: extra_files[name] for name in names}
    raw = read_source(source, {name: (s["questions"], s["answers"]) for name, s in specs.items()}, **source_kw)
    return {name: normalize(specs[name]["category"], q, a, where=specs[name]["answers"], source=name)
            for name, (q, a) in raw.items()}


# ---------------------------------------------------------------- exec answers

_ARITHMETIC = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b}


def _literal(node):
    """The JSON value of one argument node: literals, lists/tuples, dicts with string keys, and arithmetic on
    numbers (``p=1/6``, ``amount=500*500``: the value the exec checker's call receives). Anything else raises."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]  # JSON has no tuple; the scorer treats tuples as lists
    if isinstance(node, ast.Dict):
        if any(k is None or not (isinstance(k, ast.Constant) and isinstance(k.value, str)) for k in node.keys):
            raise ValueError(f"dict keys must be strings: {ast.unparse(node)}")
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
    number = (int, float)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, number) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _literal(node.left), _literal(node.right)
        if all(isinstance(v, number) and not isinstance(v, bool) for v in (left, right)):
            return _ARITHMETIC[type(node.op)](left, right)
    raise ValueError(f"not a literal value: {ast.unparse(node)}")


def _allowed(value):
    """``value`` in the possible-answer format: dicts (also inside a list of dicts) become
    ``{key: [value]}``, as BFCL writes nested answers and ``gold_calls`` resolves them."""
    if isinstance(value, dict):
        return {k: [_allowed(v)] for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_allowed(v) for v in value]
    return value


def _dotted(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError(f"the called name is not a plain (dotted) name: {ast.unparse(node)}")


def parse_call(text, functions, where):
    """One exec answer, a Python call string such as ``f(n=20, k=5)``, as a possible-answer entry
    ``{"f": {"n": [20], "k": [5]}}``: each parameter a list of acceptable values (here exactly one).

    Keyword arguments are read by name. A positional argument is read only
    when the called function's schema (in ``functions``) has exactly one
    parameter: otherwise its name would be a guess at the schema's order.
    What cannot be read exactly (a variable, a nested call, ``*args``) raises
    a ``DataError`` naming ``where`` (the file and row) and the string.
    """
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call):
            raise ValueError("not a function call")
        name = _dotted(node.func)
        params = {}
        if node.args:
            schema = {fn.get("name"): fn for fn in functions}.get(name, {})
            names = list(schema.get("parameters", {}).get("properties", {}))
            if len(node.args) != 1 or len(names) != 1 or isinstance(node.args[0], ast.Starred):
                raise ValueError(f"positional arguments need a function with exactly one parameter to name them; "
                                 f"{name} has {len(names)}")
            params[names[0]] = _literal(node.args[0])
        for kw in node.keywords:
            if kw.arg is None:
                raise ValueError(f"**{ast.unparse(kw.value)} names no parameter")
            if kw.arg in params:
                raise ValueError(f"parameter {kw.arg} given twice")
            params[kw.arg] = _literal(kw.value)
    except (SyntaxError, ValueError, ArithmeticError) as e:
        raise DataError(f"{where}: cannot read the answer {text!r} as a call ({e}); "
                        "fix that answer or leave its source out of data.extra_files") from None
    return {name: {p: [_allowed(v)] for p, v in params.items()}}


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


def _take(groups, rows, quota):
    """Whole groups, in the given order, while they fit the per-category ``quota`` (updated in place).

    Returns ``(taken, left)`` as lists of groups.
    """
    taken, left = [], []
    for group in groups:
        counts = Counter(rows[i]["category"] for i in group)
        if all(counts[c] <= quota.get(c, 0) for c in counts):
            taken.append(group)
            for c in counts:
                quota[c] -= counts[c]
        else:
            left.append(group)
    return taken, left


def _take_scarcest_first(groups, rows, quota):
    """As ``_take``, but first among the groups holding the category with the fewest rows, then the next.

    BFCL's multiple rows mostly share their functions with a parallel_multiple
    row: taken in plain seeded order, groups of parallel_multiple alone use up
    that quota before enough multiple rows are reached (after the default test
    draw, a validation side could not hold even 10 multiple rows); in this
    order 40 per category fit (seeds 0-4).
    """
    available = Counter(rows[i]["category"] for group in groups for i in group)
    taken, left = [], list(groups)
    for cat in sorted(quota, key=lambda c: (available[c], c)):
        holding = [g for g in left if any(rows[i]["category"] == cat for i in g)]
        more, _ = _take(holding, rows, quota)
        taken += more
        left = [g for g in left if g not in more]  # groups are disjoint: equal means the same
    return taken, left


def _flat(groups):
    return sorted(i for g in groups for i in g)


def _short(quota, side, knob):
    if short := {c: q for c, q in quota.items() if q > 0}:
        raise DataError(f"cannot fill the {side} split without leakage; short by {short}: lower {knob}")


def split_rows(rows, test_per_category, seed, train_per_category=None, strict=False,
               test_categories=CATEGORIES, train_categories=CATEGORIES):
    """``(train, test)``: ``split_sides`` with no validation side."""
    train, _, test = split_sides(rows, test_per_category, 0, seed, train_per_category, strict, test_categories,
                                 train_categories)
    return train, test


def split_sides(rows, test_per_category, valid_per_category, seed, train_per_category=None, strict=False,
                test_categories=CATEGORIES, train_categories=CATEGORIES):
    """Seeded ``(train, valid, test)`` split, stratified by category, with no function leakage.

    Whole components (rows linked by a shared function) go to one side, so no
    function offered in a test row is offered in any training row. Components
    are taken in a seeded random order while they fit the per-category test
    quota. ``test_categories`` / ``train_categories`` restrict each side (the
    unseen-pattern ablation tests on one category and trains on the others).

    Then ``valid_per_category`` rows per test category (0: none) are carved
    from what the test side left, also in whole components
    (``_take_scarcest_first``: the same seeded order, scarcest category
    first), so validation shares no function with test or train. The test
    side is drawn first, exactly as without a validation side.
    """
    rng = random.Random(seed)
    groups = components(rows, strict)
    rng.shuffle(groups)
    quota = {c: test_per_category for c in test_categories}
    test, rest = _take(groups, rows, quota)
    _short(quota, "test", "split.test_per_category")
    quota = {c: valid_per_category for c in test_categories}
    valid, rest = _take_scarcest_first(rest, rows, quota)
    _short(quota, "validation", "split.valid_per_category")
    by_cat = defaultdict(list)
    for i in _flat(rest):
        if rows[i]["category"] in train_categories:
            by_cat[rows[i]["category"]].append(i)
    train = []
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        rng.shuffle(idx)
        train += idx[:train_per_category] if train_per_category else idx
    return [rows[i] for i in sorted(train)], [rows[i] for i in _flat(valid)], [rows[i] for i in _flat(test)]


def is_extra(row):
    """Whether a row comes from an extra training source (``data.extra_files``), not the paper's four files."""
    return "source" in row


def add_extra(extra, held_out, strict=False):
    """``(kept, dropped)``: the extra rows that offer no function of ``held_out`` (the test and validation
    rows), and the others.

    Linked means sharing a key of ``function_keys`` (with ``strict``, near
    duplicates too), the keys the split's union-find joins rows by. The
    held-out side is already fixed, so a direct check is exactly what keeps
    it function-disjoint: an extra row linked to a held-out row only through
    another (dropped) extra row offers none of its functions.
    """
    keys = {k for row in held_out for fn in row["functions"] for k in function_keys(fn, strict)}
    kept, dropped = [], []
    for row in extra:
        linked = any(k in keys for fn in row["functions"] for k in function_keys(fn, strict))
        (dropped if linked else kept).append(row)
    return kept, dropped


def split_study(rows, extra, test_per_category, valid_per_category, seed, train_per_category=None):
    """The main study's ``(train, valid, test, pool, dropped)``.

    ``rows`` (the paper's four categories) are split by ``split_sides``: test
    first, exactly as with no validation side or extra rows, then validation;
    ``train`` holds the rest of them. ``pool`` holds the ``extra`` rows that
    offer no test or validation function, the candidates for the training
    side (``with_sources`` adds those of chosen sources); ``dropped`` the others.
    """
    train, valid, test = split_sides(rows, test_per_category, valid_per_category, seed, train_per_category)
    pool, dropped = add_extra(extra, valid + test)
    return train, valid, test, pool, dropped


def with_sources(train, pool, sources, knob):
    """``train`` plus the ``pool`` rows of the extra ``sources``, refused if a source has none there.

    ``knob`` names the params key that chose ``sources``, for the error.
    """
    missing = sorted(set(sources) - {row["source"] for row in pool})
    if missing:
        raise DataError(f"{knob} names {missing}, but no validated extra row comes from them (not in "
                        "data.extra_files, or every row offers a test or validation function): leave them out")
    return train + [row for row in pool if row["source"] in sources]


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
        file_rows = read_jsonl(path)
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
        rows += file_rows
    return rows


def load_categories(data_dir, categories=CATEGORIES, extra=()):
    """``data_dir``'s rows of ``categories`` (``<category>.jsonl``) then of the ``extra`` sources
    (``extra/<name>.jsonl``), as ``fetch_bfcl`` writes them; ids unique across all."""
    return read_rows(*(Path(data_dir) / f"{cat}.jsonl" for cat in categories),
                     *(Path(data_dir) / "extra" / f"{name}.jsonl" for name in extra))
