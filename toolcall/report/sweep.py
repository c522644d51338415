"""A sweep's table and plot: every experiment of a baseline commit, its params and its validation selection.

    dvc exp run --queue -S sft.iters=600 train_sft@0     # one per setting, then: dvc queue start
    python -m toolcall.report.sweep --baseline e0c5ba1 [--baseline LATER] --metrics metrics/train_sft/s0.json \\
        --out reports/sweep_sft --title "SFT on seed 0's validation split"

An experiment of `dvc exp run` is a git commit under ``refs/exps/`` whose
parent is the baseline commit it ran from; this reads each one's params.yaml
and the training stage's metrics file (its ``selection`` block:
toolcall/train/selection.py) straight from git, beside the baseline's own.
A row's settings are the params keys whose values differ from the
baseline's. Writes ``OUT.json`` (every row: settings, the selection, the
chosen step's answer format), ``OUT.md`` (the table, with each accuracy's
Wilson interval and the smallest difference the validation rows can resolve)
and ``OUT.png`` (validation accuracy against step, one line per row). The
validation split chooses; no test row is read.
"""

import argparse
import json
import math
import subprocess
import sys

import yaml

from toolcall.io import atomic_paths
from toolcall.repo import git
from toolcall.report.paired import compare_table
from toolcall.stats import paired_table, wilson

# The chosen evaluation's answer format, from the selection block's per-evaluation lists.
FORMAT = ("malformed_rate", "mean_answer_tokens", "share_at_max_tokens", "mean_calls")


def experiments(baseline, cwd="."):
    """``[(name, sha)]`` of the experiments run from ``baseline`` (a commit), oldest first."""
    full = git("rev-parse", f"{baseline}^{{commit}}", cwd=cwd).strip()
    prefix = f"refs/exps/{full[:2]}/{full[2:]}/"
    refs = git("for-each-ref", "--sort=committerdate", "--format=%(refname) %(objectname)", prefix, cwd=cwd)
    return [(ref[len(prefix):], sha) for ref, sha in (line.split() for line in refs.splitlines())]


def read_at(rev, path, cwd="."):
    """The text of ``path`` at commit ``rev``, or None where it has none."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def flatten(tree, prefix=""):
    """``{"sft.iters": 300, ...}``: params.yaml's leaves by dotted key (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()} if tree else {}


def changed(params, baseline):
    """The dotted keys whose values differ from the baseline's (new keys too), ``{key: value}``."""
    ours, base = flatten(params), flatten(baseline)
    return {k.rstrip("."): v for k, v in ours.items() if k not in base or base[k] != v}


def row(name, rev, params, base_params, metrics):
    """One table row: the settings that differ, the selection and the chosen evaluation's format."""
    sel = metrics.get("selection")
    if sel is None:
        raise ValueError(f"{name} ({rev[:7]}): its metrics have no selection block (run the stage with --valid)")
    at = sel["steps"].index(sel["chosen_step"])
    n = sel["valid_examples"]
    k = round(sel["chosen_valid_accuracy"] * n)
    return {
        "name": name, "rev": rev, "settings": changed(params, base_params),
        "valid_examples": n, "chosen_step": sel["chosen_step"], "steps_trained": metrics.get("steps_trained"),
        "chosen_valid_accuracy": sel["chosen_valid_accuracy"], "ci95": [round(x, 4) for x in wilson(k, n)],
        "start_valid_accuracy": sel["start_valid_accuracy"],
        "steps": sel["steps"], "valid_accuracy": sel["valid_accuracy"],
        **{key: sel[key][at] for key in FORMAT if key in sel},
        "gold_mean_calls": sel.get("gold_mean_calls", [None])[0],
        "chosen_correct": sel.get("chosen_correct"),  # absent in runs before it was recorded: then no pairing
        "by_category": sel.get("chosen_by_category"),
    }


def versus(row, base, alpha=0.05, power=0.8):
    """The paired comparison of ``row`` with ``base`` on the validation rows (McNemar, Newcombe's interval,
    the smallest difference these discordant rows could show), or None where either lacks its rows' results."""
    a, b = base.get("chosen_correct"), row.get("chosen_correct")
    if not a or not b or len(a) != len(b):
        return None
    table = paired_table(dict(enumerate(map(int, a))), dict(enumerate(map(int, b))))
    c = compare_table(table, 0.05, alpha, power)  # the margin only names a verdict, which a sweep does not use
    return {"delta": round(c.delta, 4), "ci95": [round(x, 4) for x in c.ci], "p_mcnemar": round(c.p_value, 4),
            "mde": round(c.mde, 4), "discordant": table[1] + table[2]}


def collect(baselines, metrics_path, names=None, cwd="."):
    """The first baseline's row, then the experiments of each baseline in turn (those named in ``names`` when
    given) that have the metrics; every row's settings are its params' differences from the first baseline's.

    Several baselines: a sweep continued after a commit (``dvc exp run`` ties each experiment to the commit it
    ran from); the rows of a later baseline also run that commit's code, which the report names per row.
    """
    first = git("rev-parse", f"{baselines[0]}^{{commit}}", cwd=cwd).strip()
    base_params = yaml.safe_load(read_at(first, "params.yaml", cwd))
    exps = [(name, sha, base) for base in baselines for name, sha in experiments(base, cwd)]
    if names:
        missing = set(names) - {n for n, _, _ in exps}
        if missing:
            raise ValueError(f"no experiment {sorted(missing)} of {', '.join(baselines)} (dvc exp list --rev REV)")
        exps = [e for e in exps if e[0] in names]
    rows = []
    for name, rev, base in [("baseline", first, baselines[0]), *exps]:
        text = read_at(rev, metrics_path, cwd)
        if text is None:
            print(f"sweep: {name} has no {metrics_path}: left out", file=sys.stderr)
            continue
        params = yaml.safe_load(read_at(rev, "params.yaml", cwd))
        rows.append({**row(name, rev, params, base_params, json.loads(text)), "from": base})
    for r in rows[1:]:
        r["vs_baseline"] = versus(r, rows[0]) if rows[0]["name"] == "baseline" else None
    return rows


def resolvable(n, alpha=0.05, power=0.8, p=0.4):
    """The smallest accuracy difference two independent runs on ``n`` rows resolve near accuracy ``p``."""
    from scipy.stats import norm

    return (norm.ppf(1 - alpha / 2) + norm.ppf(power)) * math.sqrt(2 * p * (1 - p) / n)


def shown(value):
    """A params value as params.yaml writes it (true, null, [1, 2]); strings bare."""
    return value if isinstance(value, str) else json.dumps(value)


def paired_cell(v):
    if v is None:
        return "–"
    lo, hi = v["ci95"]
    return f"{v['delta'] * 100:+.0f} [{lo * 100:+.0f}, {hi * 100:+.0f}], p = {v['p_mcnemar']:.2f}"


def markdown(rows, title, metrics_path, baseline):
    n = rows[0]["valid_examples"]
    lines = [f"# {title}", "",
             f"Each row: one `dvc exp run` from the commit named beside it, its settings the params that differ "
             f"from those of baseline `{baseline}` (the first row, that commit's own committed run); accuracy is "
             f"greedy on the {n} validation rows at the step selection kept "
             f"(`{metrics_path}`, block `selection`), with its 95% Wilson interval. Two runs on these {n} "
             f"rows resolve a difference of about {resolvable(n) * 100:.0f} points (80% power, near 40%): "
             "smaller gaps are not a choice the validation split can make. Where both runs recorded which rows "
             "they answered correctly (`chosen_correct`), the last column pairs them on those rows: the "
             "difference from the baseline, Newcombe's 95% interval and the exact McNemar p.", "",
             "| run | settings | valid acc. [95% CI] | kept step / trained | malformed | tokens | calls (gold) "
             "| vs baseline (paired) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = ", ".join(f"`{k}={shown(v)}`" for k, v in r["settings"].items()) or "(baseline)"
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['name']} (`{r['from']}`) | {settings} "
            f"| {r['chosen_valid_accuracy'] * 100:.0f}% [{lo * 100:.0f}, {hi * 100:.0f}] "
            f"| {r['chosen_step']} / {r['steps_trained']} | {r.get('malformed_rate', float('nan')) * 100:.0f}% "
            f"| {r.get('mean_answer_tokens', float('nan')):.0f} | {r.get('mean_calls', float('nan')):.2f} "
            f"({r['gold_mean_calls']}) | {paired_cell(r.get('vs_baseline'))} |")
    lines += ["", "Validation accuracy at each evaluated step:", "",
              "| run | " + " | ".join(["steps", "accuracy"]) + " |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {', '.join(map(str, r['steps']))} | "
                     f"{', '.join(f'{a:.2f}' for a in r['valid_accuracy'])} |")
    cats = next((list(r["by_category"]) for r in rows if r.get("by_category")), None)
    if cats:  # runs recorded before chosen_by_category existed show dashes
        lines += ["", "Validation accuracy by category at the kept step:", "",
                  "| run | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for r in rows:
            by = r.get("by_category") or {}
            lines.append(f"| {r['name']} | " + " | ".join(f"{by[c] * 100:.0f}%" if c in by else "–" for c in cats)
                         + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in rows:
        settings = ", ".join(f"{k}={shown(v)}" for k, v in r["settings"].items()) or "baseline"
        ax.plot(r["steps"], r["valid_accuracy"], marker="o", label=settings)
    ax.set_xlabel("step")
    ax.set_ylabel(f"greedy validation accuracy ({rows[0]['valid_examples']} rows)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, action="append",
                    help="the commit the experiments ran from (dvc exp show's baseline); repeatable: the first one's "
                         "own run is the baseline row")
    ap.add_argument("--metrics", required=True,
                    help="the training stage's metrics file, e.g. metrics/train_sft/s0.json")
    ap.add_argument("--out", required=True, help="path without suffix: writes OUT.json, OUT.md, OUT.png")
    ap.add_argument("--title", default="Sweep on the validation split")
    ap.add_argument("--exp", action="append", help="only these experiments (repeatable; default: all)")
    args = ap.parse_args(argv)
    rows = collect(args.baseline, args.metrics, args.exp)
    if not rows:
        sys.exit(f"sweep: neither {args.baseline[0]} nor any experiment has {args.metrics}")
    table = {"baselines": args.baseline, "metrics": args.metrics, "rows": rows}
    with atomic_paths([f"{args.out}.json", f"{args.out}.md", f"{args.out}.png"]) as (js, md, png):
        js.write_text(json.dumps(table, indent=1) + "\n")
        md.write_text(markdown(rows, args.title, args.metrics, args.baseline[0]))
        plot(rows, png, args.title)


if __name__ == "__main__":
    main()
