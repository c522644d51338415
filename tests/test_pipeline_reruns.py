"""End to end, after the one `dvc repro` of the tiny DAG (tests/pipeline_repo.py): the ablation arms'
outputs, and what a change of [ablations.*], [dpo] or [rl] reruns (params written, then `dvc repro`:
tests/test_pipeline.py is the one that runs `dvc exp run` itself).
"""

import json

import pytest
import yaml

from pipeline_repo import SEEDS, built_repo, ran_stages, rerun, run, set_params
from toolcall.io import run_path
from toolcall.stats import record_table


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return built_repo(tmp_path_factory)[0]


def metrics_of(repo, kind, name):
    return json.loads((repo / "metrics" / "ablations" / kind / f"{name}.json").read_text())


def test_ablation_arms_write_metrics_and_report_sections(repo):
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
    set_params(repo, **{"ablations.diversity.budget": 4})
    assert ran_stages(run("dvc repro", repo)) == {f"ablation_{s}@diversity_{a}" for s in ("split", "train", "eval")
                               for a in ("low", "high")} | {"report_ablations"}


def test_dpo_and_rl_continue_sft_and_rerun_alone(repo):
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
    for param, value, stage, extra in (("dpo.beta", 0.2, "dpo", set()), ("rl.learning_rate", 0.0002, "rl", rl_arms)):
        set_params(repo, **{param: value})
        ran, changed = rerun(repo, "dvc repro", readers)
        branch = {f"train_{stage}@{s}" for s in SEEDS} | {f"eval@sft_{stage}-{s}" for s in SEEDS}  # every seed
        assert ran == branch | {f"export@sft_{stage}"} | extra | changed
