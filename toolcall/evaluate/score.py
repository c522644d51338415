"""Score model outputs against BFCL answers and summarize them with intervals."""

from collections import Counter, defaultdict

from toolcall.calls.parsing import parse_calls
from toolcall.calls.scoring import check
from toolcall.stats import wilson


def score_output(row, text, repair=None):
    """Parse one raw output and check it; a prediction record for the JSONL file."""
    parsed = parse_calls(text, repair=repair)
    if parsed.error_type:
        valid, error_type = False, parsed.error_type
    else:
        result = check(row["functions"], parsed.calls, row["ground_truth"], row["category"])
        valid, error_type = result.valid, result.error_type
    return {
        "id": row["id"],
        "category": row["category"],
        "raw": text,
        "calls": parsed.calls,
        "valid": valid,
        "error_type": error_type,
    }


def accuracy(records):
    n = len(records)
    k = sum(r["valid"] for r in records)
    lo, hi = wilson(k, n)
    return {"accuracy": round(k / n, 4) if n else 0.0, "n": n, "correct": k, "ci95": [round(lo, 4), round(hi, 4)]}


# The scorer's error for an answer with fewer or more calls than asked (every checker's ``<checker>:wrong_count``).
WRONG_COUNT = ":wrong_count"


def scored(records):
    """``accuracy`` plus, of the wrong answers, how many have the wrong number of calls and their share.

    The share follows the failure that dominates the parallel categories
    (answers that stop after the first call); null when nothing is wrong.
    """
    out = accuracy(records)
    wrong = out["n"] - out["correct"]
    count = sum(1 for r in records if not r["valid"] and (r["error_type"] or "").endswith(WRONG_COUNT))
    return {**out, "wrong_count": count, "wrong_count_share": round(count / wrong, 4) if wrong else None}


def summarize(records):
    """The metrics file layout: overall and by category (accuracy, wrong_count share), and error counts."""
    by_cat = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r)
    return {
        "overall": scored(records),
        "by_category": {c: scored(rs) for c, rs in sorted(by_cat.items())},
        "errors": dict(Counter(r["error_type"] for r in records if not r["valid"]).most_common()),
    }
