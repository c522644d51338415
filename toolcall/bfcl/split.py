"""The function-disjoint split: rows that share a function stay on one side."""

import random
import re
from collections import Counter, defaultdict

from toolcall.bfcl import CATEGORIES
from toolcall.bfcl.rows import is_extra
from toolcall.errors import DataError

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


def live_side(live, train, valid):
    """``(kept, dropped)``: the second test set (test_live), the ``live`` rows that offer no function of a
    ``train`` or ``valid`` row, and the others.

    Sharing a function means what it means to the split (``function_keys``: the
    name). Both sides are fixed by then (``train`` with data.extra's rows), so
    the direct check of ``add_extra`` keeps test_live function-disjoint from
    them. It may share functions with the paper's test side: both are only
    ever scored.
    """
    return add_extra(live, train + valid)


def study_sides(rows, categories, use, live_test, test_per_category, valid_per_category, seed,
                train_per_category=None):
    """The main study's sides from every fetched row (the paper's and every extra source's, stage split).

    Returns ``(sides, drawn)``: ``sides`` maps train, valid, test, extra (the
    pool) and test_live to their rows; ``drawn`` maps extra and test_live to
    the rows each was drawn from (the rest were dropped for offering a
    function of another side). Only rows of ``categories`` are used. The rows
    of the ``live_test`` sources (params split.live_test) form test_live
    (``live_side``), never the pool, so no training side can hold one; the
    pool's rows of the ``use`` sources (data.extra) join the training side
    (``with_sources``), and test_live is kept apart from that side too.
    """
    paper = [r for r in rows if not is_extra(r)]
    extra = [r for r in rows if is_extra(r) and r["category"] in categories]
    drawn = {"extra": [r for r in extra if r["source"] not in live_test],
             "test_live": [r for r in extra if r["source"] in live_test]}
    train, valid, test, pool, _ = split_study(paper, drawn["extra"], test_per_category, valid_per_category, seed,
                                              train_per_category)
    train = with_sources(train, pool, use, "data.extra")
    test_live, _ = live_side(drawn["test_live"], train, valid)
    return {"train": train, "valid": valid, "test": test, "extra": pool, "test_live": test_live}, drawn


def with_sources(train, pool, sources, knob):
    """``train`` plus the ``pool`` rows of the extra ``sources``, refused if a source has none there.

    ``knob`` names the params key that chose ``sources``, for the error.
    """
    missing = sorted(set(sources) - {row["source"] for row in pool})
    if missing:
        raise DataError(f"{knob} names {missing}, but no validated extra row comes from them (not in "
                        "data.extra_files, or every row offers a test or validation function): leave them out")
    return train + [row for row in pool if row["source"] in sources]

