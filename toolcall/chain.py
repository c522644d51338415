"""A real run as a chain of stages, each committed to git as it finishes.

    python -m toolcall.chain train_sft@0 eval@sft-0 eval_live@sft-0

Runs ``dvc repro --single-item`` on each stage in the order given, and after each
one commits exactly that stage's git-tracked outputs (``cache: false`` in
dvc.yaml: metrics, predictions, adapters, plots) and ``dvc.lock``, nothing else
of the working tree: code edited meanwhile stays out of the commit. A run that
spans sessions keeps every finished stage (docs/reproducibility.md). The chain
stops at the first stage that fails; what finished before it is committed.
"""

import argparse
import os
import subprocess
import sys

from dvc.exceptions import DvcException
from dvc.repo import Repo

from toolcall.repo import git


def git_paths(repo, stage):
    """What git holds of ``stage``: its ``cache: false`` outputs, and the .gitignore beside each cached one
    (DVC lists a new cached output there), as repo-relative paths."""
    try:
        stages = list(repo.stage.collect(stage))
    except DvcException as e:
        raise SystemExit(f"chain: {stage!r}: {e}") from None
    if len(stages) != 1:
        raise SystemExit(f"chain: {stage!r} names {len(stages)} stages, not one (see `dvc stage list`)")
    outs = stages[0].outs
    ignores = {os.path.join(os.path.dirname(o.def_path), ".gitignore") for o in outs if o.use_cache}
    return [o.def_path for o in outs if not o.use_cache] + sorted(ignores)


def run_stage(repo, stage):
    """``dvc repro --single-item stage``, then one commit of its outputs and dvc.lock (none if nothing changed)."""
    root = repo.root_dir
    if subprocess.run(["dvc", "repro", "--single-item", stage], cwd=root).returncode:
        raise SystemExit(f"chain: {stage} failed; the stages before it are committed")
    # git refuses a pathspec that matches nothing: keep what exists now or what git had
    paths = [p for p in ["dvc.lock", *git_paths(repo, stage)] if os.path.exists(os.path.join(root, p))
             or git("ls-files", "--", p, cwd=root)]
    if not git("status", "--porcelain", "--", *paths, cwd=root).strip():
        print(f"chain: {stage} was up to date, nothing to commit", flush=True)
        return
    git("add", "--", *paths, cwd=root)
    git("commit", "-q", "-m", f"{stage}: dvc repro --single-item {stage}", "--", *paths, cwd=root)
    print(f"chain: {stage} committed", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="+", help="stage names as `dvc stage list` prints them, e.g. train_sft@0")
    args = ap.parse_args(argv)
    repo = Repo()  # the repository of the working directory, as `dvc repro` finds it
    for stage in args.stages:  # every name checked before the first stage runs for hours
        git_paths(repo, stage)
    for stage in args.stages:
        run_stage(repo, stage)


if __name__ == "__main__":
    sys.exit(main())
