"""Command lines that several stages share."""

import argparse


def continuation_parser(doc, name):
    """The command line of a stage that continues the SFT adapter on the training split (train_dpo, train_rl).

    ``doc``: the stage's docstring (its first line is the description);
    ``name``: the stage, which names its default metrics file and dvclive directory.
    """
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("sft_dir")
    ap.add_argument("train")
    ap.add_argument("out_dir")
    ap.add_argument("--metrics", default=f"metrics/{name}.json")
    ap.add_argument("--live", default=f"dvclive/{name}")
    return ap
