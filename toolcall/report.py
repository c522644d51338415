"""The study's report: our numbers with n and 95% intervals, beside the papers'."""

from pathlib import Path

from .data import CATEGORIES
from .stats import paired_comparison

# "What Actually Improves LLM Tool Calling?" Table 1 (overall accuracy, %).
PAPER_TABLE1 = {"base": 9.7, "sft": 57.0, "sft_dpo": 57.7, "sft_rl": 58.0}
VARIANT_NAMES = {"base": "Base model", "sft": "SFT", "sft_dpo": "SFT + DPO", "sft_rl": "SFT + RL"}


def pct(x):
    return f"{100 * x:.1f}%"


def cell(m):
    """``57.0% [50.1–63.7] (n=200)``: accuracy, Wilson 95% interval, n."""
    lo, hi = m["ci95"]
    return f"{pct(m['accuracy'])} [{100 * lo:.1f}–{100 * hi:.1f}] (n={m['n']})"


def verdict(p_value, delta):
    if p_value >= 0.05:
        return "inside the noise at this n"
    return "better" if delta > 0 else "worse"


def main_table(metrics, predictions, baseline="sft"):
    """Table 1 layout: overall and per category, the paper beside us, paired tests."""
    variants = [v for v in VARIANT_NAMES if v in metrics]
    cats = [c for c in CATEGORIES if any(c in metrics[v]["by_category"] for v in variants)]
    lines = [
        "| Method | Ours, overall | Paper | " + " | ".join(cats) + " | vs " + VARIANT_NAMES.get(baseline, baseline)
        + " (paired McNemar) |",
        "|---" * (len(cats) + 4) + "|",
    ]
    for v in variants:
        m = metrics[v]
        per_cat = [cell(m["by_category"][c]) if c in m["by_category"] else "—" for c in cats]
        compare = "—"
        if v != baseline and baseline in predictions and v in predictions:
            pc = paired_comparison(predictions[baseline], predictions[v])
            compare = (f"{100 * pc['delta']:+.1f} pts, p={pc['p_value']:.3f} "
                       f"({pc['only_base']} vs {pc['only_other']} discordant): {verdict(pc['p_value'], pc['delta'])}")
        paper = f"{PAPER_TABLE1[v]:.1f}%" if v in PAPER_TABLE1 else "—"
        lines.append(f"| {VARIANT_NAMES[v]} | {cell(m['overall'])} | {paper} | " + " | ".join(per_cat)
                     + f" | {compare} |")
    return "\n".join(lines)


def error_table(metrics, top=6):
    variants = [v for v in VARIANT_NAMES if v in metrics]
    lines = ["| Method | most frequent errors (count) |", "|---|---|"]
    for v in variants:
        errs = list(metrics[v].get("errors", {}).items())[:top]
        lines.append(f"| {VARIANT_NAMES[v]} | " + ", ".join(f"`{e}` {n}" for e, n in errs) + " |")
    return "\n".join(lines)


def bar_chart(metrics, path):
    """Grouped bars per category with Wilson intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANT_NAMES if v in metrics]
    groups = ["overall"] + [c for c in CATEGORIES if c in metrics[variants[0]]["by_category"]]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, v in enumerate(variants):
        ms = [metrics[v]["overall"] if g == "overall" else metrics[v]["by_category"][g] for g in groups]
        acc = [m["accuracy"] for m in ms]
        err = [[a - m["ci95"][0] for a, m in zip(acc, ms)], [m["ci95"][1] - a for a, m in zip(acc, ms)]]
        ax.bar([x + i * width for x in range(len(groups))], acc, width, yerr=err, capsize=3,
               label=VARIANT_NAMES[v])
    ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AST accuracy (95% Wilson CI)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
