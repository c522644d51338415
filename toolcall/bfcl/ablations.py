"""Training and test sets of the ablations, drawn from the validated rows.

Every set comes from ``data/validated`` (the main split's rows after the
template checks), so its rows passed the same checks as the main study's and
no ablation needs to validate again.

* ``unseen_tools``: train and test re-split with ``strict=True``: no test
  function is offered in training by name, normalized name, name without
  namespace, or parameter set (paper Table 2, "unseen tools").
* ``unseen_patterns``: test on parallel_multiple only, train on the three
  simpler patterns; functions are kept apart by name as in the main split, so
  the call pattern is what is new (paper Table 2, "unseen patterns").
* ``diversity_low`` / ``diversity_high``: ``budget`` training rows, all from
  simple or an equal share of each category, drawn from the main training
  split and the extra pool (every extra source's validated rows but the live
  test's, split.live_test: the paper's own training rows hold 325 simple
  ones); both are scored on the main test split (paper Table 3).
* ``extra_with``: the paper's training rows plus the extra pool's rows of
  ``sources`` (never a live test source: the pool holds none), trained with all of [sft] (stage ablation_train_extra),
  against the main study's SFT of the first seed (the paper's rows plus
  data.extra's, same settings), both scored on the main test split.

The unseen_* splits re-split the paper's rows (training, validation and test
sides together) and then add the main training split's extra rows
(data.extra's) that offer no function of their test side, as the main split
does (unseen_tools by its strict keys; unseen_patterns only those of the
training patterns).
"""

import random
from collections import defaultdict

from toolcall.bfcl import CATEGORIES
from toolcall.bfcl.rows import is_extra
from toolcall.bfcl.split import add_extra, split_rows, with_sources
from toolcall.errors import DataError

PATTERN_TEST = ("parallel_multiple",)
PATTERN_TRAIN = ("simple", "multiple", "parallel")
DIVERSITY = {"diversity_low": ("simple",), "diversity_high": CATEGORIES}
# params.yaml [ablations.<section>] each split reads (toolcall.config.load: AblationSplitConfig,
# DiversityConfig, ExtraDataConfig).
SECTIONS = {"unseen_tools": "unseen_tools", "unseen_patterns": "unseen_patterns", "diversity_low": "diversity",
            "diversity_high": "diversity", "extra_with": "extra"}


def budget_subset(rows, budget, seed, categories):
    """``budget`` rows, an equal share from each category (the first ones take the remainder), seeded."""
    by_cat = defaultdict(list)
    for i, row in enumerate(rows):
        by_cat[row["category"]].append(i)
    rng = random.Random(seed)
    chosen = []
    for j, cat in enumerate(categories):
        share = budget // len(categories) + (j < budget % len(categories))
        if share > len(by_cat[cat]):
            raise DataError(f"budget {budget} needs {share} {cat} rows but the training split and extra pool have "
                            f"{len(by_cat[cat])}: lower ablations.diversity.budget")
        chosen += rng.sample(by_cat[cat], share)
    return [rows[i] for i in sorted(chosen)]


def make_split(name, train, test, p, valid=(), pool=()):
    """``(train_rows, test_rows)`` of one split, ``p`` its config (``SECTIONS``).

    ``test_rows`` is None where the main test split is used. ``valid`` (the
    main validation side) joins the pool the unseen_* splits re-split;
    ``pool`` is the main split's extra pool (data/validated/extra.jsonl).
    """
    paper = [row for row in train if not is_extra(row)] + list(valid) + list(test)
    extra = [row for row in train if is_extra(row)]
    if name == "unseen_tools":
        train, test = split_rows(paper, p.test_per_category, p.seed, strict=True)
        return train + add_extra(extra, test, strict=True)[0], test
    if name == "unseen_patterns":
        train, test = split_rows(paper, p.test_per_category, p.seed,
                                 test_categories=PATTERN_TEST, train_categories=PATTERN_TRAIN)
        return train + add_extra([row for row in extra if row["category"] in PATTERN_TRAIN], test)[0], test
    if name in DIVERSITY:
        ids = {row["id"] for row in train}  # data.extra's rows are in both
        rows = train + [row for row in pool if row["id"] not in ids]
        return budget_subset(rows, p.budget, p.seed, DIVERSITY[name]), None
    if name == "extra_with":
        return with_sources([row for row in train if not is_extra(row)], pool, p.sources, "ablations.extra.sources"), None
    raise ValueError(f"unknown ablation split {name!r}: expected one of {sorted(SECTIONS)}")
