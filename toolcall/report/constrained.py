"""Constrained decoding as a column of the main study: each variant's constrained runs against its greedy runs.

Stages eval_constrained_base and eval_constrained@<variant>-<seed>
(stages/eval_constrained.py) decode every run's test items again, greedily,
under the grammar of each item's offered functions: each variant has a
constrained run per seed beside its greedy one, on the same items and the
same model. Per variant the comparison is constrained vs greedy over items x
seeds, judged as a step is (``crossed.compare_seeds``: the crossed analysis
with several seeds, one paired table for base's single run), with Holm over
the variants' comparisons. Its entry in metrics/study.json is a step's
(``power.step_metrics``) with both mean accuracies beside it.
"""

from toolcall.errors import DataError
from toolcall.report.crossed import compare_seeds, variance_components
from toolcall.report.main import Step, correctness, load_runs, run_accuracy, spread_cell, variants_in
from toolcall.report.paired import adjusted_verdict, family_holm
from toolcall.report.power import DIGITS, step_metrics
from toolcall.report.verdicts import VARIANT_NAMES, detectable, interval, points, verdict_text


def constrained_comparisons(greedy, constrained, cfg):
    """A ``main.Step`` per variant of ``greedy``: its greedy runs (before) against its constrained runs (after).

    ``greedy`` / ``constrained``: ``main.load_runs`` frames of the same
    variants and seeds. Each seed's constrained run is paired with that
    seed's greedy run, item by item.
    """
    acc = run_accuracy(greedy)["overall"]
    steps = []
    for v in variants_in(greedy):
        b, a = correctness(greedy, v), correctness(constrained, v)
        if list(a.index) != list(b.index) or list(a.columns) != list(b.columns):
            raise DataError(f"{v}'s constrained runs ({len(a)} items, {list(a.columns)}) are not its greedy runs "
                            f"({len(b)} items, {list(b.columns)}); rerun its eval_constrained stages (dvc repro)")
        components = variance_components(b, a) if b.shape[1] > 1 else None
        steps.append(Step(v, v, compare_seeds(b, a, cfg.equivalence_margin, cfg.alpha, cfg.power),
                          tuple(acc.loc[v]), components))
    return steps


def constrained_table(steps, greedy, constrained, cfg):
    """Per variant: greedy and constrained mean (min–max over seeds), Δ with interval, p (Holm), MDE, verdicts."""
    g, k = run_accuracy(greedy)["overall"], run_accuracy(constrained)["overall"]
    level = f"{100 * (1 - cfg.alpha):g}% CI"
    lines = [f"| Variant | items × seeds | greedy: mean (min–max) | constrained: mean (min–max) "
             f"| Δ accuracy [{level}] | p (Holm) | MDE ({100 * cfg.power:g}% power) | verdict | after Holm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for step, adjusted in zip(steps, family_holm([s.comparison for s in steps])):
        c, v = step.comparison, step.after
        lines.append(f"| {VARIANT_NAMES[v]} | {c.n} × {c.seeds} | {spread_cell(g.loc[v])} | {spread_cell(k.loc[v])} "
                     f"| {points(c.delta)} pts {interval(c.ci)} | {c.p_value:.3f} ({adjusted[0]:.3f}) "
                     f"| {detectable(c)} | {verdict_text(c, cfg)} | {adjusted_verdict(c, *adjusted, cfg.alpha)} |")
    return "\n".join(lines)


def constrained_metrics(steps, greedy, constrained, cfg):
    """metrics/study.json's "constrained": ``{variant: step_metrics entry + greedy and constrained mean}``."""
    g, k = (r.groupby("variant")["valid"].mean() for r in (greedy, constrained))
    adjusted = family_holm([s.comparison for s in steps])
    return {s.after: {**step_metrics(s, a, cfg.alpha), "greedy": round(float(g[s.after]), DIGITS),
                      "constrained": round(float(k[s.after]), DIGITS)} for s, a in zip(steps, adjusted)}


def constrained_section(predictions_dir, variants, seeds, greedy, cfg):
    """The report's section on constrained decoding and its study.json entries: ``{"parts", "metrics"}``.

    ``predictions_dir``: the constrained runs (data/predictions_constrained, laid
    out as data/predictions); ``greedy``: the main study's runs (``load_runs``).
    """
    constrained = load_runs(predictions_dir, variants, seeds)
    steps = constrained_comparisons(greedy, constrained, cfg)
    unparseable = int(constrained["error_type"].fillna("").str.startswith("parse:").sum())
    parts = [
        "## Constrained decoding, every variant and seed",
        "",
        "Every run of Table 1 decoded again on the test split, greedily, under a grammar of each item's offered "
        "functions (`toolcall/calls/constrained.py`, llguidance; stages `eval_constrained_base`, `eval_constrained`): "
        "only their names and parameters, values of their types, one or more calls in the template's format; the "
        "grammar reads the schemas, never the answer. Each seed's constrained run is paired with its own greedy "
        "run on the same items, judged as the steps above (over items × seeds; base's one greedy run: one "
        f"paired table), Holm over these {len(steps)} comparisons. Constrained outputs that do not parse: "
        f"{unparseable} of {len(constrained)}.",
        "",
        constrained_table(steps, greedy, constrained, cfg),
        "",
    ]
    return {"parts": parts, "metrics": constrained_metrics(steps, greedy, constrained, cfg)}
