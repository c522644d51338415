"""Accuracy intervals and paired tables: what the eval and ablation stages compute and store.

No test of a difference lives here: the reports judge every paired table
(p-values, intervals, verdicts) in ``toolcall/report/paired.py``, a file
only the report stages depend on, so changing how they judge does not make
DVC retrain or re-evaluate.
"""

import math

# A stored paired table's cells, in the order of the tuple ``(both, only_before, only_after, neither)``.
TABLE_CELLS = ("both_correct", "only_before", "only_after", "both_wrong")


def wilson(k, n, z=1.959964):
    """Wilson score 95% interval for k successes out of n (well-behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_table(before, after):
    """``(both, only_before, only_after, neither)`` over the ids two ``{id: correct}`` maps share."""
    ids = set(before) & set(after)
    both = sum(1 for i in ids if before[i] and after[i])
    only_before = sum(1 for i in ids if before[i] and not after[i])
    only_after = sum(1 for i in ids if after[i] and not before[i])
    return both, only_before, only_after, len(ids) - both - only_before - only_after


def table_record(before, after, before_name, after_name):
    """The paired table of two ``{id: correct}`` maps as a metrics record that names the two arms.

    ``{"before": before_name, "after": after_name, "both_correct": .., "only_before": .., "only_after": ..,
    "both_wrong": ..}``: the counts over the ids both maps hold, from which the report computes every
    p-value, interval and verdict (``record_table`` reads it back).
    """
    return {"before": before_name, "after": after_name, **dict(zip(TABLE_CELLS, paired_table(before, after)))}


def record_table(record):
    """The ``(both, only_before, only_after, neither)`` tuple of a ``table_record``."""
    return tuple(record[cell] for cell in TABLE_CELLS)
