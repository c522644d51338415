"""Inference-time scaffolding: JSON repair, best-of-N and constrained decoding; none sees the answer.

The paper's claim: both give no benefit when the model already writes valid
JSON. JSON repair (``json_repair.repair_json``) is tried only on a block that
is not valid JSON as it stands, so re-scoring existing outputs counts exactly
what it changes. Best-of-N keeps, out of N sampled outputs, the first that
parses and fits the offered function schemas (``output_problem``), else the
most frequent one; the choice reads ``row["functions"]`` and nothing else, so
it is usable at inference time. Scoring every sample gives the oracle pass@N
(any of N correct), an upper bound no selector without the answer reaches.
Schema-constrained decoding (``constrained``) is scored here like the others,
against the greedy outputs on the same items. Each summary stores its paired
table against those greedy outputs (``paired``: ``stats.table_record``), not
a test of it: the report judges the table (``toolcall/report/paired.py``).
"""

import argparse
import json
from collections import Counter

import json_repair

from toolcall.calls.parsing import parse_calls
from toolcall.calls.schema import call_problem
from toolcall.evaluate.score import accuracy, score_output, summarize
from toolcall.stats import table_record


def arm_parser(doc, generates=True):
    """The command line every scaffold arm's stage starts from: the arm's name, the test file and the
    variant's greedy predictions on it; with ``generates``, the model (and adapter) the arm generates with."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("name")
    if generates:
        ap.add_argument("--model", required=True)
        ap.add_argument("--adapter")
    ap.add_argument("--test", required=True)
    ap.add_argument("--greedy", required=True, help="the variant's greedy predictions on that test file")
    return ap


def output_problem(text, functions):
    """Why a raw output would not run against ``functions`` (parse error or schema misfit), or None."""
    parsed = parse_calls(text)
    if parsed.error_type:
        return parsed.error_type
    return next(filter(None, (call_problem(c, functions) for c in parsed.calls)), None)


def _vote_key(text):
    parsed = parse_calls(text)
    return json.dumps(parsed.calls, sort_keys=True) if not parsed.error_type else text.strip()


def select(row, samples):
    """``(index, how)`` of the sample best-of-N keeps, from ``row["functions"]`` alone.

    ``how`` is ``schema`` (the first sample that parses and fits the schemas)
    or ``vote`` (none does: the most frequent output, parsed calls compared
    canonically, the earliest on a tie).
    """
    functions = row["functions"]
    for i, text in enumerate(samples):
        if output_problem(text, functions) is None:
            return i, "schema"
    keys = [_vote_key(text) for text in samples]
    counts = Counter(keys)
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if counts[k] == top), "vote"


def first_per_category(rows, k):
    """The first ``k`` rows of each category, in file order (all rows when ``k`` is None)."""
    seen = Counter()
    kept = []
    for row in rows:
        seen[row["category"]] += 1
        if k is None or seen[row["category"]] <= k:
            kept.append(row)
    return kept


def best_of_n(rows, samples):
    """One prediction record per row: the kept sample, scored, plus every sample and the oracle."""
    records = []
    for row, texts in zip(rows, samples):
        i, how = select(row, texts)
        scored = [score_output(row, text) for text in texts]
        records.append({**scored[i], "chosen": i, "chosen_by": how, "samples": texts,
                        "n_correct": sum(s["valid"] for s in scored), "oracle": any(s["valid"] for s in scored)})
    return records


def best_of_n_summary(records, greedy):
    """Metrics of the kept samples, the oracle pass@N, and the paired table against greedy ``{id: valid}``."""
    metrics = summarize(records)
    metrics["oracle"] = accuracy([{"valid": r["oracle"]} for r in records])
    metrics["chosen_by"] = dict(Counter(r["chosen_by"] for r in records))
    metrics["paired"] = table_record(greedy, {r["id"]: r["valid"] for r in records}, "greedy", "best_of_n")
    return metrics


def repair(rows, records):
    """Re-score greedy prediction records with JSON repair; no generation. Marks what it changed."""
    by_id = {row["id"]: row for row in rows}
    out = []
    for old in records:
        new = score_output(by_id[old["id"]], old["raw"], repair=json_repair.repair_json)
        new["changed"] = (new["calls"], new["error_type"]) != (old["calls"], old["error_type"])
        out.append(new)
    return out


def repair_summary(old, new):
    """Metrics after repair: how many outputs were malformed JSON, changed, and the paired table against before."""
    metrics = summarize(new)
    metrics["repair"] = {
        "malformed_json_before": sum(r["error_type"] == "parse:malformed_json" for r in old),
        "changed": sum(r["changed"] for r in new),
        "changed_and_correct": sum(r["changed"] and r["valid"] for r in new),
    }
    metrics["paired"] = table_record({r["id"]: r["valid"] for r in old}, {r["id"]: r["valid"] for r in new},
                                     "greedy", "json_repair")
    return metrics


# What constrained decoding rules out: a parsed call naming what was not offered.
UNOFFERED = ("schema:unknown_function", "schema:unknown_parameter")


def constrained_records(rows, outputs):
    """Prediction records of constrained outputs ``[(text, n_generated, n_finishing)]``, scored."""
    return [{**score_output(row, text), "generated_tokens": n, "finishing_tokens": k}
            for row, (text, n, k) in zip(rows, outputs)]


def constrained_summary(rows, records, greedy, unconstrained=None):
    """Metrics of constrained decoding, the paired table against the greedy records, and its guarantees.

    ``unconstrained``: ``[(text, n)]``, the same items decoded again without
    the constraint in the same run (the speed baseline), or None where it was
    not run; how many of them equal the greedy predictions shows the baseline
    is the greedy eval itself. Its keys are there only when it ran.
    """
    metrics = summarize(records)
    metrics["paired"] = table_record({r["id"]: r["valid"] for r in greedy}, {r["id"]: r["valid"] for r in records},
                                     "greedy", "constrained")
    metrics["constrained"] = {
        "finished_at_max_tokens": sum(r["finishing_tokens"] > 0 for r in records),
        "unparseable": sum((r["error_type"] or "").startswith("parse:") for r in records),
        "unoffered_names": sum(any(call_problem(c, row["functions"]) in UNOFFERED for c in r["calls"])
                               for row, r in zip(rows, records)),
        "generated_tokens": sum(r["generated_tokens"] for r in records),
    }
    if unconstrained is not None:
        metrics["constrained"] |= {
            "unconstrained_tokens": sum(n for _, n in unconstrained),
            "unconstrained_same_as_greedy": sum(text == g["raw"] for (text, _), g in zip(unconstrained, greedy)),
        }
    return metrics
