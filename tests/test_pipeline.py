"""End to end: `dvc repro` of the whole DAG on a tiny model, then `dvc exp run` as `make exp` runs it.

`make exp`'s `dvc exp run -S sft.lora_rank=4 report report_post_sft` must rerun
the main study from train_sft on, for every seed of study.seeds, and leave
stale the rest of what depends on [sft] (the ablation arms, the exports) and
nothing upstream or beside it. Then what the
repro wrote that [sft] does not change: validation's sides and dataset, the
ablation arms' metrics and report. The repo is built once for this file and
tests/test_pipeline_reruns.py (tests/pipeline_repo.py).
"""

import json
import sys

import pytest
import yaml

from dag_deps import expanded_stages
from pipeline_repo import MAIN_STUDY, RUNS, SEEDS, SFT_DOWNSTREAM, built_repo, ran_stages, rerun, run
from toolcall.io import run_path
from toolcall.stats import record_table


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return built_repo(tmp_path_factory)


def test_repro_runs_every_stage_and_writes_outputs(built):
    repo, out = built
    stages = expanded_stages(repo)
    assert ran_stages(out) == set(stages)
    assert {f"train_{t}@{s}" for t in ("sft", "dpo", "rl", "grpo") for s in SEEDS} <= set(stages)
    for variant, seed in RUNS:
        m = json.loads(run_path(repo / "metrics" / "eval", variant, seed, ".json").read_text())
        assert set(m) >= {"overall", "by_category", "errors"}
        assert m["overall"]["n"] == 12 and set(m["by_category"]) == {"simple", "multiple", "parallel", "parallel_multiple"}
        lo, hi = m["overall"]["ci95"]
        assert 0 <= lo <= m["overall"]["accuracy"] <= hi <= 1
        assert m["overall"]["wrong_count"] <= 12 - m["overall"]["correct"]
        preds = [json.loads(line) for line in run_path(repo / "data" / "predictions", variant, seed, ".jsonl").open()]
        assert len(preds) == 12 and set(preds[0]) >= {"id", "category", "raw", "calls", "valid", "error_type"}
    # The second test set: every run scored on the live rows the split and validate kept.
    live = json.loads((repo / "metrics" / "validate.json").read_text())["test_live"]
    assert live["n_kept"] > 0 and live["split_dropped"]["n_dropped"] == 1  # the fixture row offering paper functions
    for variant, seed in RUNS:
        m = json.loads(run_path(repo / "metrics" / "eval_live", variant, seed, ".json").read_text())
        assert m["overall"]["n"] == live["n_kept"] and set(m["by_category"]) == set(live["by_category"])
        preds = [json.loads(line) for line in run_path(repo / "data" / "predictions_live", variant, seed, ".jsonl").open()]
        assert len(preds) == live["n_kept"] and {p["id"] for p in preds} == {
            r["id"] for r in map(json.loads, (repo / "data" / "validated" / "test_live.jsonl").open())}
    # Constrained decoding, every run: each item decoded again and paired with that run's greedy predictions.
    for variant, seed in RUNS:
        c = json.loads(run_path(repo / "metrics" / "eval_constrained", variant, seed, ".json").read_text())
        assert c["overall"]["n"] == sum(record_table(c["paired"])) == 12
        assert c["constrained"]["unparseable"] == c["constrained"]["unoffered_names"] == 0
        assert "unconstrained_tokens" not in c["constrained"]  # no baseline in the main study's column
        preds = [json.loads(line) for line in
                 run_path(repo / "data" / "predictions_constrained", variant, seed, ".jsonl").open()]
        assert len(preds) == 12
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
    assert "| SFT + DPO | 1 seed |" in post_sft and "| 12 × 1 |" in post_sft
    assert "## Constrained decoding, every variant and seed" in post_sft
    study = json.loads((repo / "metrics" / "study.json").read_text())
    assert list(study["constrained"]) == ["base", "sft", "sft_dpo", "sft_rl", "sft_grpo"]
    assert set(study) == {"test", "live", "pooled", "constrained"}
    assert list(study["pooled"]) == ["sft_vs_base", "dpo_vs_sft", "rft_vs_sft", "grpo_vs_sft"]
    assert study["constrained"]["sft"]["items"] == 12 and study["constrained"]["sft"]["seeds"] == len(SEEDS)
    assert (repo / "reports" / "report.png").stat().st_size > 1000
    assert "up to date" in run("dvc status", repo)


def test_changing_sft_reruns_the_main_study_then_only_what_else_depends_on_it(built, tmp_path):
    repo, _ = built
    readers = {s for s in expanded_stages(repo) if s.startswith(("ablation_repair@", "report"))}
    # `make exp`: only its targets' upstream, so of the readers just the two reports may run.
    ran, changed = rerun(repo, "dvc exp run -S sft.lora_rank=4 report report_post_sft", readers)
    assert ran == (MAIN_STUDY - readers) | (changed & MAIN_STUDY)
    diff = run("dvc metrics diff", repo)
    for s in SEEDS:  # rank 8 -> 4 halves them, in every seed's run
        assert f"metrics/train_sft/s{s}.json" in diff
    assert "trainable_parameters" in diff
    # A sweep's table (toolcall/report/sweep.py) reads the experiment back from git, beside its baseline.
    first = f"metrics/train_sft/s{SEEDS[0]}.json"
    run(f"{sys.executable} -m toolcall.report.sweep --baseline HEAD --metrics {first} --out {tmp_path}/sweep", repo)
    base, exp = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert base["name"] == "baseline" and base["settings"] == {} and exp["settings"] == {"sft.lora_rank": 4}
    assert exp["chosen_valid_accuracy"] == json.loads((repo / first).read_text())["selection"]["chosen_valid_accuracy"]
    paired = exp["vs_baseline"]  # on the same validation rows, each run's chosen_correct
    assert paired["delta"] == pytest.approx(exp["chosen_valid_accuracy"] - base["chosen_valid_accuracy"], abs=1e-3)
    assert "| `sft.lora_rank=4` |" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    # What `make exp` left behind the new [sft] on purpose, and nothing else: the stages `dvc status`
    # calls changed, with everything DVC's own graph puts downstream of them (what an untargeted run
    # would rerun; its stages all ran in the repro above). A reader (JSON repair, the reports) may be
    # spared when the tiny model's outputs come out as they were.
    assert changed <= SFT_DOWNSTREAM
    left = stale_with_downstream(repo)
    assert SFT_DOWNSTREAM - MAIN_STUDY - readers <= left <= SFT_DOWNSTREAM - MAIN_STUDY


def stale_with_downstream(repo):
    """The stages `dvc status` reports and every stage downstream of one in DVC's graph (names)."""
    import networkx as nx
    from dvc.repo import Repo

    stale = set(json.loads(run("dvc status --json", repo)))
    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edges point from a stage to the stages it depends on
        return {s.name for node in graph if node.name in stale for s in (node, *nx.ancestors(graph, node))}


# The tests below run after the `dvc exp run`s above on purpose: while this file's
# longest test runs, its xdist process holds more than two pending tests and so takes
# no other file's tests into its queue (xdist's loadfile scheduler refills at <= 2).


def test_validate_writes_every_side_and_the_dataset(built):
    repo, _ = built  # [sft] changed above; validate is upstream of it
    validate = json.loads((repo / "metrics" / "validate.json").read_text())
    assert validate["test"]["n_kept"] == 12 and validate["valid"]["n_kept"] == 8
    assert len((repo / "data" / "validated" / "valid.jsonl").read_text().splitlines()) == 8
    assert {f.name for f in (repo / "data" / "validated" / "dataset").iterdir()} == {
        "README.md", "train.parquet", "valid.parquet", "test.parquet", "test_live.parquet"}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    data_params, live = params["data"], params["split"]["live_test"]
    assert set(validate["train"]["by_source"]) == {"paper", *data_params["extra"]}
    assert set(validate["valid"]["by_source"]) == {"paper"} and set(validate["extra"]["by_source"]) == set(
        data_params["extra_files"]) - set(live)  # every other source's rows are validated for the ablation arms
    assert set(validate["test_live"]["by_source"]) == set(live)


def metrics_of(repo, kind, name):
    return json.loads((repo / "metrics" / "ablations" / kind / f"{name}.json").read_text())


def test_ablation_arms_write_metrics_and_report_sections(built):
    repo, _ = built
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
