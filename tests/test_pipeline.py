"""End to end: `dvc repro` of the whole DAG in a temporary git repo on a tiny model.

Then `make exp`'s `dvc exp run -S sft.lora_rank=4 report report_post_sft` must
rerun the main study from train_sft on, for every seed of study.seeds, and an
untargeted `dvc exp run` after it the rest of what depends on [sft] (the
ablation arms, the exports) and nothing upstream or beside it; `-S dpo.beta=...`
only DPO's branch, for every seed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dag_deps import expanded_stages
from tiny_model import make_tiny_model
from toolcall.io import run_path
from toolcall.stats import record_table

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
    params["validate"].update(max_seq_len=4096)  # the tiny byte-level tokenizer makes long sequences
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


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_tiny_repo(repo, make_tiny_model(tmp_path_factory.mktemp("tiny")))
    run("git init -q && git config user.email t@t && git config user.name t && dvc init -q"
        " && git add -A && git commit -qm init", repo)
    out = run("dvc repro", repo)
    run("git add -A && git commit -qm repro", repo)
    return repo, out


# Extra per-stage overrides that keep later stages tiny; extended as stages are added.
TINY_OVERRIDES = {
    # Two seeds, the first not 0: every seed replicates the main study, the rest uses the first.
    "study": {"seeds": [1, 0]},
    "ablations": {
        "sft": {"iters": 2, "epochs": None, "max_seq_len": 4096},
        "scaffold": {"n": 2, "temperature": 0.7, "seed": 0, "per_category": 1},
        "unseen_tools": {"seed": 0, "test_per_category": 1},
        "unseen_patterns": {"seed": 0, "test_per_category": 2},
        "diversity": {"seed": 0, "budget": 8},
    },
    "dpo": {"prompts": 4, "samples_per_prompt": 2, "epochs": 1.0, "batch_size": 2, "max_tokens": 8, "valid_prompts": 2,
            "steps_per_eval": 1},
    # min_reward 0 keeps every sample: the tiny model never passes the AST check, and
    # the round should still train.
    "rl": {"rounds": 2, "prompts": 4, "samples_per_prompt": 2, "iters": 2, "batch_size": 2, "max_tokens": 8,
           "min_reward": 0.0},
}


SEEDS = TINY_OVERRIDES["study"]["seeds"]
RUNS = [("base", None)] + [(v, s) for v in ("sft", "sft_dpo", "sft_rl") for s in SEEDS]


def test_repro_runs_every_stage_and_writes_outputs(repo):
    repo, out = repo
    stages = expanded_stages(repo)
    assert ran_stages(out) == set(stages)
    assert {f"train_{t}@{s}" for t in ("sft", "dpo", "rl") for s in SEEDS} <= set(stages)
    for variant, seed in RUNS:
        m = json.loads(run_path(repo / "metrics" / "eval", variant, seed, ".json").read_text())
        assert set(m) >= {"overall", "by_category", "errors"}
        assert m["overall"]["n"] == 12 and set(m["by_category"]) == {"simple", "multiple", "parallel", "parallel_multiple"}
        lo, hi = m["overall"]["ci95"]
        assert 0 <= lo <= m["overall"]["accuracy"] <= hi <= 1
        assert m["overall"]["wrong_count"] <= 12 - m["overall"]["correct"]
        preds = [json.loads(line) for line in run_path(repo / "data" / "predictions", variant, seed, ".jsonl").open()]
        assert len(preds) == 12 and set(preds[0]) >= {"id", "category", "raw", "calls", "valid", "error_type"}
    for variant, seed in RUNS[1:]:
        assert (run_path(repo / "models", variant, seed) / "adapters.safetensors").exists()
        assert json.loads(run_path(repo / "metrics", f"train_{variant.removeprefix('sft_')}", seed, ".json")
                          .read_text())
    for variant in ("sft", "sft_dpo", "sft_rl"):  # the export stages: fused dir + GGUF, parser kept
        export = repo / "models" / "export" / variant
        assert (export / "model.gguf").stat().st_size > 0 and not (export / "adapters.safetensors").exists()
        assert json.loads((export / "tokenizer_config.json").read_text())["tool_parser_type"] == "json_tools"
    assert (repo / "reports" / "report.md").read_text().startswith("# Results")
    post_sft = (repo / "reports" / "post_sft.md").read_text()
    assert f"| SFT + DPO | {len(SEEDS)} seeds |" in post_sft and f"| 12 × {len(SEEDS)} |" in post_sft
    assert (repo / "reports" / "report.png").stat().st_size > 1000
    validate = json.loads((repo / "metrics" / "validate.json").read_text())
    assert validate["test"]["n_kept"] == 12 and validate["valid"]["n_kept"] == 8
    assert len((repo / "data" / "validated" / "valid.jsonl").read_text().splitlines()) == 8
    data_params = yaml.safe_load((repo / "params.yaml").read_text())["data"]
    assert set(validate["train"]["by_source"]) == {"paper", *data_params["extra"]}
    assert set(validate["valid"]["by_source"]) == {"paper"} and set(validate["extra"]["by_source"]) == set(
        data_params["extra_files"])  # every source's rows are validated for the ablation arms
    assert "up to date" in run("dvc status", repo)


# The main study's trained stages, every seed's: SFT, DPO and RL (both start from their seed's SFT) and their evals.
PER_SEED = {f"{stage}@{s}" for stage in ("train_sft", "train_dpo", "train_rl") for s in SEEDS} | {
    f"eval@{v}-{s}" for v in ("sft", "sft_dpo", "sft_rl") for s in SEEDS}
# Everything downstream of [sft]: the main study's trained stages and reports; and the
# ablation arms, whose training reads [sft] under [ablations.sft]'s overrides, with every
# stage that uses their models or outputs.
SFT_DOWNSTREAM = {
    *PER_SEED, "report", "report_post_sft", "report_ablations",
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
MAIN_STUDY = PER_SEED | {"report", "report_post_sft"}


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


def test_changing_sft_reruns_the_main_study_then_only_what_else_depends_on_it(repo):
    repo, _ = repo
    readers = {s for s in expanded_stages(repo) if s.startswith(("ablation_repair@", "report"))}
    # `make exp`: only its targets' upstream, so of the readers just the two reports may run.
    ran, changed = rerun(repo, "dvc exp run -S sft.lora_rank=4 report report_post_sft", readers)
    assert ran == (MAIN_STUDY - readers) | (changed & MAIN_STUDY)
    diff = run("dvc metrics diff", repo)
    for s in SEEDS:  # rank 8 -> 4 halves them, in every seed's run
        assert f"metrics/train_sft/s{s}.json" in diff
    assert "trainable_parameters" in diff
    # What `make exp` left behind the new [sft] on purpose: an untargeted run reruns just that
    # (and the readers of what either run changed).
    ran, changed_after = rerun(repo, "dvc exp run", readers)
    changed |= changed_after
    assert changed <= SFT_DOWNSTREAM
    assert ran == (SFT_DOWNSTREAM - MAIN_STUDY - readers) | (changed - MAIN_STUDY)
    assert "up to date" in run("dvc status", repo)


def metrics_of(repo, kind, name):
    return json.loads((repo / "metrics" / "ablations" / kind / f"{name}.json").read_text())


def test_ablation_arms_write_metrics_and_report_sections(repo):
    repo, _ = repo
    evals = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["ablation_eval"]["foreach"]
    for arm in evals:
        m = metrics_of(repo, "eval", arm)
        assert m["overall"]["n"] == {"unseen_tools": 4, "unseen_patterns": 2}.get(arm.rsplit("_", 1)[0], 12)
        assert (repo / "data" / "ablations" / "predictions" / f"{arm}.jsonl").exists()
    assert set(metrics_of(repo, "eval", "unseen_patterns_sft")["by_category"]) == {"parallel_multiple"}
    low, high = (metrics_of(repo, "train", f"diversity_{a}") for a in ("low", "high"))
    assert low["examples"] == high["examples"] == 8
    content, masked = metrics_of(repo, "train", "format_content"), metrics_of(repo, "train", "format_masked")
    assert (content["style"], content["mask_prompt"], masked["style"], masked["mask_prompt"]) == (
        "content", False, "structured", True)
    assert content["max_seq_len"] == masked["max_seq_len"] >= content["tokens_max"]
    assert "targets_unlike_structured" in content
    assert set(metrics_of(repo, "repair", "sft")["repair"]) == {"malformed_json_before", "changed",
                                                                "changed_and_correct"}
    best = metrics_of(repo, "best_of_n", "base")
    assert best["overall"]["n"] == 4 and best["oracle"]["correct"] >= best["overall"]["correct"]
    for arm, n in (("base", 12), ("sft", 12), ("unseen_tools_sft", 4), ("unseen_patterns_sft", 2)):
        c = metrics_of(repo, "constrained", arm)  # every item; at 8 tokens too, none unparseable
        assert c["overall"]["n"] == sum(record_table(c["paired"])) == n
        assert c["constrained"]["unconstrained_same_as_greedy"] == n
        assert c["constrained"]["unparseable"] == c["constrained"]["unoffered_names"] == 0
    report = (repo / "reports" / "ablations.md").read_text()
    for title in ("## Scaffolding", "## Table 2", "## Table 3", "## Extra training sources", "second seed's format"):
        assert title in report


def test_changing_an_ablation_param_reruns_only_its_arms(repo):
    repo, _ = repo
    out = run("dvc exp run -S ablations.diversity.budget=4", repo)
    assert ran_stages(out) == {f"ablation_{s}@diversity_{a}" for s in ("split", "train", "eval")
                               for a in ("low", "high")} | {"report_ablations"}


def test_dpo_and_rl_continue_sft_and_rerun_alone(repo):
    repo, _ = repo
    for s in SEEDS:
        dpo = json.loads(run_path(repo / "metrics", "train_dpo", s, ".json").read_text())
        assert dpo["prompts"] == 4 and dpo["samples"] == 8 and dpo["pairs"] == sum(dpo["pairs_by_source"].values()) > 0
        rl = json.loads(run_path(repo / "metrics", "train_rl", s, ".json").read_text())
        assert rl["algo"] == "rft" and [r["updated"] for r in rl["rounds"].values()] == [True, True]
        for out in ("sft_dpo", "sft_rl"):
            assert json.loads((run_path(repo / "models", out, s) / "adapter_config.json").read_text())[
                "lora_parameters"] == json.loads((run_path(repo / "models", "sft", s) / "adapter_config.json")
                                                 .read_text())["lora_parameters"]
    # Each seed trains its own models: seed 1's and seed 0's SFT adapters differ (LoRA's init is seeded).
    sft = [(run_path(repo / "models", "sft", s) / "adapters.safetensors").read_bytes() for s in SEEDS]
    assert sft[0] != sft[1]
    assert "| SFT + DPO vs SFT |" in (repo / "reports" / "post_sft.md").read_text()
    assert "SFT + DPO" not in (repo / "reports" / "report.md").read_text()  # base vs SFT only
    # [rl] also drives the RL generalization arms of the ablations.
    rl_arms = {f"ablation_train_rl@{s}" for s in ("unseen_tools", "unseen_patterns")} | {
        f"ablation_eval@{s}_rl" for s in ("unseen_tools", "unseen_patterns")}
    readers = {"report_post_sft", "report_ablations"}
    for param, stage, extra in (("dpo.beta=0.2", "dpo", set()), ("rl.learning_rate=0.0002", "rl", rl_arms)):
        ran, changed = rerun(repo, f"dvc exp run -S {param}", readers)
        branch = {f"train_{stage}@{s}" for s in SEEDS} | {f"eval@sft_{stage}-{s}" for s in SEEDS}  # every seed
        assert ran == branch | {f"export@sft_{stage}"} | extra | changed
