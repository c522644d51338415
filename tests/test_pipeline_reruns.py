"""End to end, after the one `dvc repro` of the tiny DAG (tests/pipeline_repo.py): what a change of
[ablations.*], [dpo] or [rl] reruns (params written, then `dvc repro`: tests/test_pipeline.py is the
one that runs `dvc exp run` itself), and that DPO and RL continue their seed's SFT.
"""

import json

import pytest

from pipeline_repo import SEEDS, built_repo, ran_stages, rerun, run, set_params
from toolcall.io import run_path


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return built_repo(tmp_path_factory)[0]


def test_changing_an_ablation_param_reruns_only_its_arms(repo):
    set_params(repo, **{"ablations.diversity.budget": 4})
    assert ran_stages(run("dvc repro", repo)) == {f"ablation_{s}@diversity_{a}" for s in ("split", "train", "eval")
                               for a in ("low", "high")} | {"report_ablations"}


def test_dpo_and_rl_continue_sft_and_rerun_alone(repo):
    for s in SEEDS:
        dpo = json.loads(run_path(repo / "metrics", "train_dpo", s, ".json").read_text())
        by_source = dpo["pairs_by_source"]
        assert dpo["prompts"] == 4 and dpo["samples"] == 8
        assert dpo["pairs"] == sum(by_source["chosen"].values()) == sum(by_source["rejected"].values()) > 0
        rl = json.loads(run_path(repo / "metrics", "train_rl", s, ".json").read_text())
        assert rl["algo"] == "rft" and [r["updated"] for r in rl["rounds"].values()] == [True, True]
        grpo = json.loads(run_path(repo / "metrics", "train_grpo", s, ".json").read_text())
        assert grpo["algo"] == "grpo" and len(grpo["rounds"]) == 1 and grpo["selection"]["steps"][0] == 0
        for out in ("sft_dpo", "sft_rl", "sft_grpo"):
            assert json.loads((run_path(repo / "models", out, s) / "adapter_config.json").read_text())[
                "lora_parameters"] == json.loads((run_path(repo / "models", "sft", s) / "adapter_config.json")
                                                 .read_text())["lora_parameters"]
    assert "| SFT + DPO vs SFT |" in (repo / "reports" / "post_sft.md").read_text()
    assert "SFT + DPO" not in (repo / "reports" / "report.md").read_text()  # base vs SFT only
    # [rl] also drives the RL generalization arms of the ablations; GRPO is [rl] with [grpo]'s keys in place,
    # so a change of [rl] retrains both RL arms. What reads a retrained model (every seed's evals on both test
    # sets and constrained, the export, the reports) reruns when that model changed: a DPO or RL arm whose
    # validation accuracy never beats its start keeps its SFT adapter, and on the tiny model it may.
    def readers(stages):
        return {f"{ev}@sft_{stage}-{s}" for stage in stages for ev in ("eval", "eval_live", "eval_constrained")
                for s in SEEDS} | {f"export@sft_{stage}" for stage in stages if stage != "grpo"} | {
            "report_post_sft", "report_ablations"}

    rl_arms = {f"ablation_train_rl@{s}" for s in ("unseen_tools", "unseen_patterns")}
    rl_arm_evals = {f"ablation_eval@{s}_rl" for s in ("unseen_tools", "unseen_patterns")}
    for param, value, stages, extra, extra_readers in (("dpo.beta", 0.2, ["dpo"], set(), set()),
                                                       ("rl.learning_rate", 0.0002, ["rl", "grpo"], rl_arms,
                                                        rl_arm_evals)):
        set_params(repo, **{param: value})
        ran, changed = rerun(repo, "dvc repro", readers(stages) | extra_readers)
        assert ran == {f"train_{stage}@{s}" for stage in stages for s in SEEDS} | extra | changed
