"""Score model outputs against BFCL answers and summarize them with intervals."""

from collections import Counter, defaultdict

from .parsing import parse_calls
from .scoring import check
from .stats import wilson


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


def summarize(records):
    """The metrics file layout: overall, by category, and error counts."""
    by_cat = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r)
    return {
        "overall": accuracy(records),
        "by_category": {c: accuracy(rs) for c, rs in sorted(by_cat.items())},
        "errors": dict(Counter(r["error_type"] for r in records if not r["valid"]).most_common()),
    }
