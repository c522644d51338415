"""Check every row before training; a bad row is dropped with a reason.

The second seed's lesson: malformed tool-call annotations (unbalanced tags,
empty calls, targets that do not parse back) silently wreck fine-tuning. Here
each row's rendered target must parse back to exactly its gold calls, and its
gold calls must pass the same AST check the evaluation uses.
"""

from collections import Counter

from toolcall.bfcl.rows import gold_calls
from toolcall.calls.parsing import parse_calls
from toolcall.calls.schema import function_problem
from toolcall.calls.scoring import check


def row_problem(row, fmt, max_seq_len):
    """Return ``(reason, None)`` for a bad row or ``(None, n_tokens)`` for a good one."""
    if not row.get("messages") or not all(m.get("content") for m in row["messages"]):
        return "row:empty_messages", None
    functions = row.get("functions") or []
    if not functions:
        return "row:no_functions", None
    for fn in functions:
        if problem := function_problem(fn):
            return problem, None
    gt = row.get("ground_truth") or []
    if not gt or any(not isinstance(e, dict) or len(e) != 1 for e in gt):
        return "gold:empty_or_malformed", None
    offered = {fn["name"]: fn for fn in functions}
    for entry in gt:
        ((name, params),) = entry.items()
        if name not in offered:
            return "gold:unknown_function", None
        for req in offered[name]["parameters"].get("required", []):
            if not any(v != "" for v in params.get(req, [])):
                return "gold:missing_required", None
    calls = gold_calls(gt)
    if not check(functions, calls, gt, row["category"]).valid:
        return "gold:fails_ast_check", None
    try:
        completion = fmt.completion(row["messages"], functions, calls)
    except Exception as e:  # a template error is a property of this row's content
        return f"template:{type(e).__name__}", None
    opened, closed = completion.count("<tool_call>"), completion.count("</tool_call>")
    if opened != closed or opened != len(calls):
        return "target:unbalanced_tags", None
    parsed = parse_calls(completion)
    if parsed.error_type or parsed.calls != calls:
        return "target:round_trip_mismatch", None
    tokens, _ = fmt.example(row, calls)
    if len(tokens) > max_seq_len:
        return "target:too_long", None
    return None, len(tokens)


PAPER = "paper"  # how reports name the rows of the paper's four files, which carry no ``source``
TOO_LONG = "target:too_long"


def validate_rows(rows, fmt, max_seq_len):
    """Split rows into kept and dropped; return ``(kept, report)``.

    ``report["by_source"]`` counts rows in and kept, and the reasons, per
    source (``PAPER`` for the paper's rows, else the extra source's name).
    """
    kept, dropped, lengths = [], [], []
    by_source = {}
    for row in rows:
        reason, n_tokens = row_problem(row, fmt, max_seq_len)
        counts = by_source.setdefault(row.get("source", PAPER), {"n_in": 0, "n_kept": 0, "reasons": Counter()})
        counts["n_in"] += 1
        if reason:
            dropped.append({"id": row.get("id"), "reason": reason})
            counts["reasons"][reason] += 1
        else:
            kept.append(row)
            lengths.append(n_tokens)
            counts["n_kept"] += 1
    report = {
        "n_in": len(rows),
        "n_kept": len(kept),
        "n_dropped": len(dropped),
        "drop_fraction": round(len(dropped) / len(rows), 4) if rows else 0.0,
        "reasons": dict(Counter(d["reason"] for d in dropped)),
        "by_category": dict(Counter(r["category"] for r in kept)),
        "tokens_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
        "tokens_max": max(lengths, default=0),
        "by_source": {src: {**c, "reasons": dict(c["reasons"])} for src, c in by_source.items()},
        "dropped": dropped,
    }
    return kept, report


def excess_drops(report, max_drop_fraction):
    """``{source: (fraction, reasons)}`` for each source of ``report`` that lost more than ``max_drop_fraction``
    of its rows: a broken template or data file, not a few bad rows.

    An extra source's rows past ``max_seq_len`` do not count: they only show
    how long its schemas are (live_multiple offers many long functions per row).
    """
    excess = {}
    for source, c in report["by_source"].items():
        counted = {r: n for r, n in c["reasons"].items() if source == PAPER or r != TOO_LONG}
        if c["n_in"] and sum(counted.values()) / c["n_in"] > max_drop_fraction:
            excess[source] = (sum(counted.values()) / c["n_in"], counted)
    return excess
