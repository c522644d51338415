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
