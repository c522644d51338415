"""Reading BFCL files (wheel, local, hub) and normalizing them into rows; exec answers parsed."""

import ast
import zipfile
from pathlib import Path

from toolcall.bfcl import CATEGORIES
from toolcall.errors import DataError
from toolcall.io import parse_jsonl

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


