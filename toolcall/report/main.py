"""The study's report: our numbers with n and 95% intervals, beside the papers', with a verdict per comparison.

The main study's runs (every scored item of base, and of SFT, SFT + DPO and
SFT + RL under each seed) are one pandas DataFrame, one row per (variant,
run, item); accuracies, seed spreads, error shares and the items x seeds
matrices of the paired comparisons are group-bys and pivots of it.
"""

import dataclasses
import math
from pathlib import Path
from typing import Optional

import pandas as pd

from toolcall.bfcl import CATEGORIES
from toolcall.errors import DataError
from toolcall.io import read_json, read_jsonl, run_path
from toolcall.report.crossed import compare_seeds, variance_components
from toolcall.report.paired import Comparison, adjusted_verdict, family_holm, table_delta
from toolcall.report.verdicts import VARIANT_NAMES, claim_relation, detectable, interval, pct, points, verdict_text

# "What Actually Improves LLM Tool Calling?" Table 1 (overall accuracy, %).
# The paper's RL is reward-filtered (our rft, sft_rl); GRPO is held to the same "RL moves < 1 point" claim.
PAPER_TABLE1 = {"base": 9.7, "sft": 57.0, "sft_dpo": 57.7, "sft_rl": 58.0, "sft_grpo": 58.0}
# BFCL's leaderboard, non-live AST accuracy (%) per category (python simple, multiple, parallel,
# parallel_multiple), full test sets: data_non_live.csv of the gorilla repo's gh-pages branch,
# 2025-12 snapshot. FC: the model's native function calling; prompted: tools in the prompt.
LEADERBOARD = {
    "Granite-4.0-350m (FC)": (83.0, 84.5, 70.0, 55.5),
    "Hammer2.1-0.5b (FC)": (83.25, 81.0, 69.0, 51.5),
    "Qwen2.5-0.5B-Instruct (FC)": (81.5, 78.0, 60.0, 50.0),
    "Llama-3.2-1B-Instruct (FC)": (75.0, 50.5, 44.0, 15.0),
    "Gemma-3-1b-it (prompted)": (64.0, 36.0, 0.0, 1.5),
}


# ---------------------------------------------------------------- the main study's runs

# Evaluated once, greedily, with no training: no seed (stage eval_base). Every other variant runs per seed.
SEEDLESS = ("base",)
GREEDY = "greedy"  # the run label of a seedless variant; a seed's run is "s<seed>"
FIELDS = ("id", "category", "valid", "error_type")


def run_label(seed):
    return GREEDY if seed is None else f"s{seed}"


def load_runs(predictions_dir, variants, seeds):
    """Every scored item of every run: a DataFrame with columns variant, run, id, category, valid, error_type.

    Base is read from ``<dir>/base.jsonl``, every other variant from
    ``<dir>/<variant>/s<seed>.jsonl`` for each of ``seeds`` (io.run_path):
    exactly the seeds asked for, so a file left by a seed since removed from
    ``study.seeds`` is not read.
    """
    parts = []
    for v in variants:
        for seed in [None] if v in SEEDLESS else seeds:
            path = run_path(predictions_dir, v, seed, ".jsonl")
            records = read_jsonl(path)
            if not records:
                raise DataError(f"{path}: no predictions; rerun its eval stage (dvc repro)")
            frame = pd.DataFrame.from_records(records, columns=list(FIELDS))
            parts.append(frame.assign(variant=v, run=run_label(seed)))
    return pd.concat(parts, ignore_index=True)


def pooled_runs(test_sets):
    """The runs of several test sets as one: each item's id prefixed by its set's name (``live:<id>``).

    Every item of every set is then one row of the items x seeds matrices, so
    a step's comparison pools the sets' items under the same seeds.
    """
    return pd.concat([r.assign(id=name + ":" + r["id"]) for name, r in test_sets.items()], ignore_index=True)


def run_accuracy(runs):
    """Accuracy of each run, overall and per category: index (variant, run), columns overall + categories."""
    keys = ["variant", "run"]
    overall = runs.groupby(keys, sort=False)["valid"].mean().rename("overall")
    by_category = runs.pivot_table(index=keys, columns="category", values="valid", aggfunc="mean")
    return pd.concat([overall, by_category[[c for c in CATEGORIES if c in by_category]]], axis=1)


def load_scores(metrics_dir, variants, seeds):
    """The eval metrics of every run (as ``load_runs``): one row per (variant, run, scope), scope "overall" or a
    category, with that block's keys (accuracy, n, correct, wrong_count, wrong_count_share, ...)."""
    rows = []
    for v in variants:
        for seed in [None] if v in SEEDLESS else seeds:
            m = read_json(run_path(metrics_dir, v, seed, ".json"))
            for scope, block in [("overall", m["overall"]), *m["by_category"].items()]:
                rows.append({"variant": v, "run": run_label(seed), "scope": scope, **block})
    return pd.DataFrame(rows)


def variants_in(runs):
    return [v for v in VARIANT_NAMES if v in set(runs["variant"])]


def spread_cell(values, sd=False):
    """``26.2% (25.5–27.0)`` over a variant's runs: mean and min–max (``sd``: ``sd 0.8;`` first); one run: ``25.5%``."""
    values = values.dropna()
    if values.empty:
        return "—"
    if len(values) == 1:
        return pct(values.iloc[0])
    sd_text = f"sd {100 * values.std(ddof=1):.1f}; " if sd else ""
    return f"{pct(values.mean())} ({sd_text}{100 * values.min():.1f}–{100 * values.max():.1f})"


def main_table(runs):
    """Table 1: each method's mean over its runs with the spread (sd; min–max), the paper beside, per category."""
    acc = run_accuracy(runs)
    cats = [c for c in CATEGORIES if c in acc]
    counts = runs.drop_duplicates("id")["category"].value_counts()
    n = counts.sum()
    lines = ["| Method | runs | Ours, overall (n=" + f"{n}): mean (sd; min–max) | Paper | "
             + " | ".join(f"{c} (n={counts[c]})" for c in cats) + " |",
             "|---" * (len(cats) + 4) + "|"]
    for v in variants_in(runs):
        a = acc.loc[v]
        which = "1 greedy" if v in SEEDLESS else f"{len(a)} seed{'s' * (len(a) > 1)}"
        paper = f"{PAPER_TABLE1[v]:.1f}%" if v in PAPER_TABLE1 else "—"
        lines.append(f"| {VARIANT_NAMES[v]} | {which} | {spread_cell(a['overall'], sd=True)} | {paper} | "
                     + " | ".join(spread_cell(a[c]) for c in cats) + " |")
    return "\n".join(lines)


def leaderboard_table(runs):
    """Our methods (mean over runs) beside BFCL's leaderboard anchors, per category and their unweighted mean."""
    acc = run_accuracy(runs).groupby(level=0).mean()
    lines = ["| Model | test items | " + " | ".join(CATEGORIES) + " | mean of the four |", "|---" * 7 + "|"]
    for v in variants_in(runs):
        cats = [100 * acc.loc[v, c] if c in acc else math.nan for c in CATEGORIES]
        lines.append(f"| SmolLM2-135M-Instruct, {VARIANT_NAMES[v]} (ours) | function-disjoint split | "
                     + " | ".join("—" if math.isnan(x) else f"{x:.1f}" for x in cats)
                     + (" | — |" if any(map(math.isnan, cats)) else f" | {sum(cats) / len(cats):.1f} |"))
    for name, cats in LEADERBOARD.items():
        mean = math.floor(10 * sum(cats) / len(cats) + 0.5) / 10  # half up, as the leaderboard rounds
        lines.append(f"| {name} | full BFCL sets | " + " | ".join(f"{x:g}" for x in cats) + f" | {mean:.1f} |")
    return "\n".join(lines)


def wrong_count_table(scores):
    """The dominant failure per method (eval metrics' wrong_count_share): of the wrong answers, the share with
    fewer or more calls than asked, overall and per category, mean over the runs (min–max)."""
    share = scores.pivot(index=["variant", "run"], columns="scope", values="wrong_count_share").astype(float)
    wrong = scores[scores["scope"] == "overall"].set_index(["variant", "run"])
    wrong = (wrong["n"] - wrong["correct"]).groupby(level=0).mean()
    cats = [c for c in CATEGORIES if c in share]
    lines = ["| Method | wrong answers (of n, mean per run) | wrong_count share, overall | " + " | ".join(cats) + " |",
             "|---" * (len(cats) + 3) + "|"]
    for v in [v for v in VARIANT_NAMES if v in wrong.index]:
        s = share.loc[v]
        lines.append(f"| {VARIANT_NAMES[v]} | {count(wrong[v])} | {spread_cell(s['overall'])} | "
                     + " | ".join(spread_cell(s[c]) for c in cats) + " |")
    return "\n".join(lines)


def correctness(runs, variant):
    """Items x runs booleans of one variant (one column for a seedless variant), rows sorted by id."""
    table = runs[runs["variant"] == variant].pivot(index="id", columns="run", values="valid").sort_index()
    missing = table.columns[table.isna().any()].tolist()
    if missing:  # a run scored other items than its siblings: not the same test split
        raise DataError(f"{variant}'s runs {missing} lack items the other runs scored "
                        f"({table.isna().sum().sum()} missing); rerun their eval stages on the same test split")
    return table.astype(bool)


def paired_runs(runs, before, after):
    """``(before, after)`` items x seeds matrices on the shared items, each seed's run against its own start.

    A seedless start (base) is the same run for every seed: its column repeats.
    """
    b, a = correctness(runs, before), correctness(runs, after)
    ids = b.index.intersection(a.index)
    if list(b.columns) == [GREEDY]:
        b = pd.concat([b[GREEDY]] * len(a.columns), axis=1, keys=a.columns)
    elif list(b.columns) != list(a.columns):
        raise DataError(f"{after}'s runs {list(a.columns)} do not match {before}'s {list(b.columns)}: each seed "
                        f"continues its own seed's {before}")
    return b.loc[ids, a.columns], a.loc[ids]


# Each post-training step against the model it starts from (DPO and RL continue SFT), and its key in
# metrics/study.json.
STEPS = (("base", "sft"), ("sft", "sft_dpo"), ("sft", "sft_rl"), ("sft", "sft_grpo"))
STEP_KEYS = {("base", "sft"): "sft_vs_base", ("sft", "sft_dpo"): "dpo_vs_sft", ("sft", "sft_rl"): "rft_vs_sft",
             ("sft", "sft_grpo"): "grpo_vs_sft"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One step's comparison, the seed-to-seed spread of the model it starts from, its variance components."""

    before: str
    after: str
    comparison: Comparison
    start_runs: tuple  # the start's overall accuracy per run
    components: Optional[tuple] = None  # (sigma_item^2, sigma_seed^2, sigma_res^2) of the differences; one seed: None


def step_comparisons(runs, cfg):
    """A ``Step`` for each step in STEPS with runs on both sides."""
    present = set(runs["variant"])
    acc = run_accuracy(runs)["overall"]
    steps = []
    for before, after in STEPS:
        if before in present and after in present:
            b, a = paired_runs(runs, before, after)
            components = variance_components(b, a) if b.shape[1] > 1 else None
            steps.append(Step(before, after, compare_seeds(b, a, cfg.equivalence_margin, cfg.alpha, cfg.power),
                              tuple(acc.loc[before]), components))
    return steps


def seed_spread_text(step):
    """The step's |Δ| against the seed-to-seed spread of its start's accuracy."""
    start, d = VARIANT_NAMES[step.before], abs(step.comparison.delta)
    if len(step.start_runs) < 2:
        return f"{start}: one run, no seed spread"
    s = pd.Series(step.start_runs)
    sd, lo, hi = s.std(ddof=1), s.min(), s.max()
    where = "inside" if d <= hi - lo else "beyond"
    ratio = f"{d / sd:.1f}× its sd" if sd > 0 else "its seeds agree exactly"
    return (f"|Δ| {100 * d:.1f} pts {where} {start}'s seed range ({100 * lo:.1f}–{100 * hi:.1f}%, sd "
            f"{100 * sd:.1f}); {ratio}")


def step_table(steps, cfg):
    """Each step: Δ and interval, per-seed Δ, p and TOST p with Holm, MDE, verdicts, the start's seed spread."""
    level = f"{100 * (1 - cfg.alpha):g}% CI"
    margin = f"±{100 * cfg.equivalence_margin:g} pts"
    lines = [f"| Step | items × seeds | Δ accuracy [{level}] | Δ per seed | p (Holm) | TOST p, {margin} (Holm) "
             f"| MDE ({100 * cfg.power:g}% power) | verdict | after Holm | against the start's seed spread |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for step, adjusted in zip(steps, family_holm([s.comparison for s in steps])):
        c = step.comparison
        per_seed = ", ".join(points(table_delta(t)) for t in c.tables)
        lines.append(f"| {VARIANT_NAMES[step.after]} vs {VARIANT_NAMES[step.before]} | {c.n} × {c.seeds} | "
                     f"{points(c.delta)} pts {interval(c.ci)} | {per_seed} | {c.p_value:.3f} ({adjusted[0]:.3f}) | "
                     f"{c.p_equivalence:.3f} ({adjusted[1]:.3f}) | {detectable(c)} | {verdict_text(c, cfg)} | "
                     f"{adjusted_verdict(c, *adjusted, cfg.alpha)} | {seed_spread_text(step)} |")
    return "\n".join(lines)


def paper_claims(steps, cfg):
    """Each step against the paper's Table 1 change: its size, or equivalence for a "< 1 point" claim."""
    lines = []
    for step, adjusted in zip(steps, family_holm([s.comparison for s in steps])):
        claimed = PAPER_TABLE1[step.after] - PAPER_TABLE1[step.before]
        c = step.comparison
        lines.append(f"- {VARIANT_NAMES[step.after]} vs {VARIANT_NAMES[step.before]}: "
                     f"{claim_relation(c, claimed, cfg)}; after Holm: {adjusted_verdict(c, *adjusted, cfg.alpha)}")
    return "\n".join(lines)


def count(x):
    """A count that may be a mean over runs: ``59`` or ``59.3``."""
    return f"{x:.1f}".removesuffix(".0")


def error_table(runs, top=6):
    """Each method's most frequent errors, counted per run (mean over its runs)."""
    lines = ["| Method | most frequent errors (count per run) |", "|---|---|"]
    for v in variants_in(runs):
        rows = runs[(runs["variant"] == v) & ~runs["valid"].astype(bool)]
        n_runs = runs.loc[runs["variant"] == v, "run"].nunique()
        counts = rows["error_type"].value_counts().head(top) / n_runs
        lines.append(f"| {VARIANT_NAMES[v]} | " + ", ".join(f"`{e}` {count(n)}" for e, n in counts.items()) + " |")
    return "\n".join(lines)


def bar_chart(runs, path):
    """Grouped bars per category: the mean over each method's runs, the min–max over its seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = run_accuracy(runs)
    variants = variants_in(runs)
    groups = ["overall"] + [c for c in CATEGORIES if c in acc]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, v in enumerate(variants):
        a = acc.loc[v, groups]
        mean = a.mean()
        ax.bar([x + i * width for x in range(len(groups))], mean, width, yerr=[mean - a.min(), a.max() - mean],
               capsize=3, label=VARIANT_NAMES[v])
    ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AST accuracy (mean; bars: min–max over seeds)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
