"""The end-to-end tests' DVC repo: the whole DAG on a tiny model and the fixture data, reproduced once.

``tests/test_pipeline.py`` and ``tests/test_pipeline_reruns.py`` each work on a
copy of one repo, built by whichever of them (or of the xdist workers running
them) asks first while the other waits on a lock: the ~4 min ``dvc repro`` runs
once, and the two files' reruns run side by side
(the order: tests/conftest.py). ``bench/repro.py`` times a
no-op ``dvc repro`` on the same recipe (``write_tiny_repo``).
"""

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dag_deps import expanded_stages
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bfcl"


def run(cmd, cwd):
    # DVC's analytics daemon would start a process per dvc command (the repo's own .dvc/config turns it off too).
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(cmd, str))
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def ran_stages(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


def write_tiny_repo(repo, tiny):
    """The DAG's code and a params.yaml for the tiny model ``tiny`` and the fixture data, in ``repo``.

    bench/repro.py times a no-op ``dvc repro`` on the same repo.
    """
    for item in ("stages", "toolcall", "native", "dvc.yaml", "params.yaml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    for cache in repo.rglob("__pycache__"):
        shutil.rmtree(cache)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="local", local_dir=str(FIXTURE))
    params["model"].update(source="local", dtype="float32", path=str(tiny))
    params["split"].update(test_per_category=3, valid_per_category=2)
    params["validate"].update(max_seq_len=4096, live_max_seq_len=4096)  # the tiny byte-level tokenizer: long sequences
    params["sft"].update(iters=3, epochs=None, batch_size=2, warmup=0, steps_per_report=1, max_seq_len=4096,
                         lora_layers=2)
    params["eval"].update(max_tokens=8, batch_size=4)
    # One process per stage: on a tiny model, starting ranks and eval workers (each imports mlx-lm, and
    # transformers imports torch in the test environment) costs ~10x the work, and this file is about the
    # DAG. The two-rank and sharded paths have their own tests (test_launch.py, test_sharding.py).
    for section in ("sft", "dpo", "rl"):
        params[section]["ranks"] = 1
    params["eval"]["workers"] = 1
    for section, overrides in TINY_OVERRIDES.items():
        params.setdefault(section, {}).update(overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# Extra per-stage overrides that keep later stages tiny; extended as stages are added.
TINY_OVERRIDES = {
    # One seed, not 0: the ablations and exports use the first seed's runs, whatever it is. One seed keeps the
    # tiny DAG (and make test) short: every seed's stages having their own paths and --seed is checked on the
    # real params by tests/test_dag.py, two seeds giving two adapters by tests/test_determinism.py, and the
    # report's items x seeds analysis by tests/test_report.py and tests/test_power.py.
    "study": {"seeds": [1]},
    "ablations": {
        "sft": {"iters": 2, "epochs": None, "max_seq_len": 4096},
        "scaffold": {"n": 2, "temperature": 0.7, "seed": 0, "per_category": 1},
        "unseen_tools": {"seed": 0, "test_per_category": 1},
        "unseen_patterns": {"seed": 0, "test_per_category": 2},
        "diversity": {"seed": 0, "budget": 8},
    },
    "dpo": {"prompts": 4, "samples_per_prompt": 2, "epochs": 1.0, "batch_size": 2, "max_tokens": 8, "valid_prompts": 2,
            "steps_per_eval": 1, "warmup": 0},
    # min_reward 0 keeps every sample: the tiny model never passes the AST check, and
    # the round should still train.
    "rl": {"rounds": 2, "prompts": 4, "samples_per_prompt": 2, "iters": 2, "batch_size": 2, "max_tokens": 8,
           "min_reward": 0.0},
    "grpo": {"rounds": 1, "prompts": 2, "samples_per_prompt": 2, "iters": 1, "batch_size": 2},
}


SEEDS = TINY_OVERRIDES["study"]["seeds"]
VARIANTS = ("sft", "sft_dpo", "sft_rl", "sft_grpo")  # trained once per seed
RUNS = [("base", None)] + [(v, s) for v in VARIANTS for s in SEEDS]


def built_repo(tmp_path_factory):
    """``(repo, dvc repro's output)``: a private copy of the once-built repo.

    Built under a lock in the directory every xdist worker shares (the parent
    of each worker's base temp): the first caller builds, a later one copies.
    """
    shared = tmp_path_factory.getbasetemp().parent
    pristine, log = shared / "pipeline-repo", shared / "pipeline-repro.log"
    with open(shared / "pipeline-repo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not log.exists():
            shutil.rmtree(pristine, ignore_errors=True)
            pristine.mkdir()
            write_tiny_repo(pristine, make_tiny_model(shared / "pipeline-tiny"))
            run("git init -q && git config user.email t@t && git config user.name t && dvc init -q"
                " && git add -A && git commit -qm init", pristine)
            out = run("dvc repro", pristine)
            run("git add -A && git commit -qm repro", pristine)
            log.write_text(out)
    repo = tmp_path_factory.mktemp("repo") / "repo"
    shutil.copytree(pristine, repo, symlinks=True)
    return repo, log.read_text()


def set_params(repo, **changes):
    """Write ``section.key=value`` changes into the repo's params.yaml (what ``dvc exp run -S`` does first)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *sections, key = dotted.split(".")
        node = params
        for s in sections:
            node = node[s]
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def digest(repo, paths):
    """Content of the given files and directories, to tell whether a stage's inputs changed."""
    out = {}
    for path in map(repo.joinpath, paths):
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        out[str(path)] = [(str(f), f.read_bytes()) for f in files if f.is_file()]
    return out


def rerun(repo, cmd, readers):
    """Run ``cmd`` in ``repo``: the stages it ran, and those of ``readers`` whose inputs it changed.

    Readers are stages that only re-read other stages' outputs (JSON repair
    re-scores greedy predictions; the reports read metrics and predictions):
    they rerun when those outputs changed, as DVC compares content, and on the
    tiny model a new adapter often leaves every greedy output as it was.
    """
    stages = expanded_stages(repo)
    before = {s: digest(repo, stages[s]["deps"]) for s in readers}
    out = run(cmd, repo)
    return ran_stages(out), {s for s in readers if digest(repo, stages[s]["deps"]) != before[s]}


# The main study's trained stages, every seed's: SFT, DPO, RL and GRPO (all three start from their seed's SFT)
# and their evals.
PER_SEED = {f"{stage}@{s}" for stage in ("train_sft", "train_dpo", "train_rl", "train_grpo") for s in SEEDS} | {
    f"eval@{v}-{s}" for v in VARIANTS for s in SEEDS}
# The same runs scored on the second test set, test_live (params split.live_test): the reports read them, so
# `make exp` reruns them.
LIVE_EVALS = {f"eval_live@{v}-{s}" for v in VARIANTS for s in SEEDS}
# The same runs decoded again under the schema constraint: report_post_sft reads them, so `make exp` reruns them.
CONSTRAINED_EVALS = {f"eval_constrained@{v}-{s}" for v in VARIANTS for s in SEEDS}
# Everything downstream of [sft]: the main study's trained stages, live evals and reports; and the
# ablation arms, whose training reads [sft] under [ablations.sft]'s overrides, with every
# stage that uses their models or outputs.
SFT_DOWNSTREAM = {
    *PER_SEED, *LIVE_EVALS, *CONSTRAINED_EVALS, "report", "report_post_sft", "report_ablations",
    *(f"ablation_train@{arm}" for arm in ("unseen_tools", "unseen_patterns", "diversity_low", "diversity_high",
                                          "format_content", "format_structured", "format_masked")),
    "ablation_train_extra",
    "ablation_train_rl@unseen_tools", "ablation_train_rl@unseen_patterns",
    *(f"ablation_eval@{arm}" for arm in ("unseen_tools_sft", "unseen_patterns_sft", "unseen_tools_rl",
                                         "unseen_patterns_rl", "diversity_low", "diversity_high", "extra_with",
                                         "format_content", "format_structured", "format_masked")),
    *(f"ablation_{kind}@{arm}" for kind in ("repair", "best_of_n", "constrained")
      for arm in ("sft", "unseen_tools_sft", "unseen_patterns_sft")),
    *(f"export@{variant}" for variant in ("sft", "sft_dpo", "sft_rl")),
}
# What `make exp` (`dvc exp run ... report report_post_sft`) may rerun: the main study only.
MAIN_STUDY = PER_SEED | LIVE_EVALS | CONSTRAINED_EVALS | {"report", "report_post_sft"}
