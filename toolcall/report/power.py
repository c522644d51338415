"""What a test set can decide: the crossed design's variance components projected to other items x seeds designs.

A step's paired differences d[i, s] over n items and S seeds give ANOVA
estimates of sigma_item^2, sigma_seed^2 and sigma_res^2
(``toolcall.report.crossed.variance_components``). A design with n' items
and S' seeds would have the expected mean squares E[MS_item] = sigma_res^2 +
S' sigma_item^2, E[MS_seed] = sigma_res^2 + n' sigma_seed^2, E[MS_res] =
sigma_res^2; ``projected`` feeds those to the analysis' own
``crossed.variance_df`` (Var(D) = sigma_item^2 / n' + sigma_seed^2 / S' +
sigma_res^2 / (n' S'), a component below 0 taken as 0, Satterthwaite's df)
and ``crossed.minimum_detectable`` gives the MDE, so projecting to the run's
own design returns the run's MDE. With sigma_seed^2 > 0 more items never get
below the seed floor sigma_seed^2 / S' (n' = inf: Var = sigma_seed^2 / S',
df = S' - 1). The projection treats the estimates as the true components.

``study_metrics`` is metrics/study.json: each test set's steps (today the
one "test" set; a "live" set and a "pooled" analysis are more keys beside it).
"""

import math

from toolcall.report.crossed import minimum_detectable, variance_df
from toolcall.report.paired import adjusted_verdict, family_holm

ITEMS = (200, 1000, 1550)  # the designs the power table projects to
SEEDS = (3, 5, 10)
TARGET = 0.05  # the MDE the seeds-needed columns aim for (accuracy units)
MAX_SEEDS = 30
DIGITS = 6  # metrics/study.json rounds every float to this many decimals: byte-stable, diffable


def projected(components, items, seeds):
    """``(Var(D), df)`` of a design with ``items`` x ``seeds`` (either may be inf) from ``(item, seed, residual)``."""
    item, seed, residual = components
    if seeds < 2 or items < 2:
        raise ValueError(f"a crossed design needs >= 2 items and >= 2 seeds, got {items} x {seeds}")
    if math.isinf(items) or math.isinf(seeds):  # the limit n -> inf (S -> inf): the seed (item) term alone
        floor, finite = (max(0.0, seed), seeds) if math.isinf(items) else (max(0.0, item), items)
        return floor / finite, (finite - 1 if floor > 0 else math.inf)
    return variance_df(residual + seeds * item, residual + items * seed, residual, items, seeds)


def projected_mde(components, items, seeds, alpha, power):
    """The MDE (accuracy units; inf where above 1) a design with ``items`` x ``seeds`` would have."""
    return minimum_detectable(*projected(components, items, seeds), items, alpha, power)


def seeds_needed(components, items, target, alpha, power, max_seeds=MAX_SEEDS):
    """The fewest seeds (2..``max_seeds``) whose projected MDE at ``items`` is <= ``target``; None: none."""
    for seeds in range(2, max_seeds + 1):
        if projected_mde(components, items, seeds, alpha, power) <= target:
            return seeds
    return None


def _pts(x, digits=1):
    return f"{100 * x:.{digits}f}" if math.isfinite(x) else "none"


def _needed_cell(components, items, alpha, power):
    seeds = seeds_needed(components, items, TARGET, alpha, power)
    if seeds is not None:
        return str(seeds)
    item_floor = projected_mde(components, items, math.inf, alpha, power)
    if item_floor > TARGET:
        return f"not reachable (the item term alone: {_pts(item_floor)} pts with ∞ seeds)"
    seed_floor = projected_mde(components, math.inf, MAX_SEEDS, alpha, power)
    if seed_floor > TARGET:
        return f"not reachable (the seed term alone: {_pts(seed_floor)} pts at {MAX_SEEDS} seeds)"
    return f"> {MAX_SEEDS}"


def power_section(steps, cfg, names):
    """Markdown: each step's variance components and MDE as run, then projected MDEs and seeds for 5 pts.

    ``steps``: ``toolcall.report.main.Step``s; one without components (one seed) is left out.
    ``names``: variant -> display name.
    """
    steps = [s for s in steps if s.components is not None]
    if not steps:
        return "One seed per variant: no seed variance to project from."
    target, level = _pts(TARGET, 0), f"{100 * cfg.power:g}% power, two-sided α={cfg.alpha:g}"
    label = {s: f"{names[s.after]} vs {names[s.before]}" for s in steps}
    lines = [
        f"The variance components of each step's paired differences (accuracy units, 0/1 per item: a difference "
        f"is -1, 0 or +1; ANOVA estimates, `toolcall/report/crossed.py` variance_components; a negative estimate "
        f"counts as 0), the MDE of the design as run ({level}), and the fewest seeds whose projected MDE is at most "
        f"{target} pts (up to {MAX_SEEDS}). Projection (`toolcall/report/power.py`): the same formula as the "
        f"analysis, Var(Δ) = σ²_item/n + σ²_seed/S + σ²_res/(nS), with Satterthwaite's df from the mean squares "
        f"those components imply at n items and S seeds, MDE = (t_(1-α/2, df) + t_(power, df)) · SE (and no "
        f"smaller than the floor the analysis uses, k²/(n+k²)); the estimates are taken as the true components, "
        f"which with {steps[0].comparison.seeds} seeds they are only roughly (σ²_seed above all). With few seeds "
        f"the MDE can rise a little with more items: the item term shrinks, Satterthwaite's df fall towards S - 1, "
        f"and the t quantiles grow faster than the standard error falls; there the seeds, not the items, bind.",
        "",
        f"| Step (test set) | items × seeds | σ²_item | σ²_seed | σ²_residual | MDE as run | seeds for MDE ≤ {target} "
        f"pts at 200 items | at 1550 items |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        c = s.comparison
        lines.append(f"| {label[s]} | {c.n} × {c.seeds} | " + " | ".join(f"{v:.5f}" for v in s.components)
                     + f" | {_pts(c.mde)} pts | {_needed_cell(s.components, 200, cfg.alpha, cfg.power)} | "
                     f"{_needed_cell(s.components, 1550, cfg.alpha, cfg.power)} |")
    lines += ["", f"Projected MDE in pts ({level}) for other designs; ∞ items leaves the seed term σ²_seed/S alone.",
              "", "| Step (test set) | items | " + " | ".join(f"{k} seeds" for k in SEEDS) + " |",
              "|---|---|" + "---|" * len(SEEDS)]
    for s in steps:
        for items in (*ITEMS, math.inf):
            cells = [_pts(projected_mde(s.components, items, k, cfg.alpha, cfg.power)) for k in SEEDS]
            lines.append(f"| {label[s]} | {'∞' if math.isinf(items) else items} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(x):
    """A float rounded to DIGITS (-0.0 as 0.0); inf or nan as null (JSON has neither)."""
    return round(float(x), DIGITS) + 0.0 if math.isfinite(x) else None


def step_metrics(step, adjusted, alpha):
    """One step's entry in metrics/study.json; ``adjusted``: its Holm ``(p, p_equivalence)``."""
    c = step.comparison
    entry = {"items": c.n, "seeds": c.seeds, "delta": _num(c.delta), "ci95": [_num(c.ci[0]), _num(c.ci[1])],
             "mde": _num(c.mde), "verdict": c.verdict, "p_holm": _num(adjusted[0]),
             "p_tost_holm": _num(adjusted[1]), "verdict_holm": adjusted_verdict(c, *adjusted, alpha)}
    if step.components is not None:
        entry["variance"] = dict(zip(("item", "seed", "residual"), map(_num, step.components)))
    return entry


def study_metrics(test_sets, keys, cfg):
    """metrics/study.json: ``{test set: {step key: step_metrics}}``, Holm over each set's steps.

    ``test_sets``: ``{"test": [Step, ...]}`` (a later "live" / "pooled" is another key);
    ``keys``: ``(before, after)`` -> the step's key ("sft_vs_base").
    """
    out = {}
    for name, steps in test_sets.items():
        adjusted = family_holm([s.comparison for s in steps])
        out[name] = {keys[(s.before, s.after)]: step_metrics(s, a, cfg.alpha) for s, a in zip(steps, adjusted)}
    return out
