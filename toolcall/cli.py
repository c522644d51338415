"""Command lines that several stages share."""

import argparse


def continuation_parser(doc, name):
    """The command line of a stage that continues the SFT adapter on the training split (train_dpo, train_rl).

    ``doc``: the stage's docstring (its first line is the description);
    ``name``: the stage, which names the examples in the help.
    """
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("sft_dir")
    ap.add_argument("train")
    ap.add_argument("out_dir")
    add_seed(ap)
    ap.add_argument("--metrics", required=True, help=f"e.g. metrics/{name}/s0.json")
    ap.add_argument("--live", required=True, help=f"dvclive directory, e.g. dvclive/{name}/s0")
    return ap


def add_seed(ap):
    """``--seed``, required: a training stage's only seed (config.seeded; dvc.yaml passes one of study.seeds)."""
    ap.add_argument("--seed", type=int, required=True, help="the run's seed (dvc.yaml: one of study.seeds)")
