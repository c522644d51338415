"""Check every row before training; a bad row is dropped with a reason.

The second seed's lesson: malformed tool-call annotations (unbalanced tags,
empty calls, targets that do not parse back) silently wreck fine-tuning. Here
each row's rendered target must parse back to exactly its gold calls, and its
gold calls must pass the same AST check the evaluation uses.
"""

from collections import Counter

from .data import gold_calls
from .parsing import parse_calls
from .schema import function_problem
from .scoring import check


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


def validate_rows(rows, fmt, max_seq_len):
    """Split rows into kept and dropped; return ``(kept, report)``."""
    kept, dropped, lengths = [], [], []
    for row in rows:
        reason, n_tokens = row_problem(row, fmt, max_seq_len)
        if reason:
            dropped.append({"id": row.get("id"), "reason": reason})
        else:
            kept.append(row)
            lengths.append(n_tokens)
    report = {
        "n_in": len(rows),
        "n_kept": len(kept),
        "n_dropped": len(dropped),
        "drop_fraction": round(len(dropped) / len(rows), 4) if rows else 0.0,
        "reasons": dict(Counter(d["reason"] for d in dropped)),
        "by_category": dict(Counter(r["category"] for r in kept)),
        "tokens_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
        "tokens_max": max(lengths, default=0),
        "dropped": dropped,
    }
    return kept, report
