"""End to end: `dvc repro` of the whole DAG in a temporary git repo on a tiny model.

Then `dvc exp run -S sft.lora_rank=4` must rerun train_sft and what depends on
it, and nothing upstream or beside it.
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

from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bfcl"


def run(cmd, cwd):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(cmd, str))
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def ran_stages(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for item in ("stages", "toolcall", "dvc.yaml", "params.yaml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    for cache in repo.rglob("__pycache__"):
        shutil.rmtree(cache)
    tiny = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="local", local_dir=str(FIXTURE))
    params["model"] = {"source": "local", "path": str(tiny)}
    params["split"].update(test_per_category=3)
    params["validate"].update(max_seq_len=4096)  # the tiny byte-level tokenizer makes long sequences
    params["sft"].update(iters=3, batch_size=2, warmup=0, steps_per_report=1, max_seq_len=4096, lora_layers=2)
    params["eval"].update(max_tokens=8, batch_size=4)
    for section, overrides in TINY_OVERRIDES.items():
        params.setdefault(section, {}).update(overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git init -q && git config user.email t@t && git config user.name t && dvc init -q"
        " && git add -A && git commit -qm init", repo)
    out = run("dvc repro", repo)
    run("git add -A && git commit -qm repro", repo)
    return repo, out


# Extra per-stage overrides that keep later stages tiny; extended as stages are added.
TINY_OVERRIDES = {}


def test_repro_runs_every_stage_and_writes_outputs(repo):
    repo, out = repo
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    expected = {f"{name}@{key}" for name, s in stages.items() if "foreach" in s for key in s["foreach"]}
    expected |= {name for name, s in stages.items() if "foreach" not in s}
    assert ran_stages(out) == expected
    for variant in ("base", "sft"):
        m = json.loads((repo / "metrics" / "eval" / f"{variant}.json").read_text())
        assert set(m) >= {"overall", "by_category", "errors"}
        assert m["overall"]["n"] == 12 and set(m["by_category"]) == {"simple", "multiple", "parallel", "parallel_multiple"}
        lo, hi = m["overall"]["ci95"]
        assert 0 <= lo <= m["overall"]["accuracy"] <= hi <= 1
        preds = [json.loads(line) for line in (repo / "data" / "predictions" / f"{variant}.jsonl").open()]
        assert len(preds) == 12 and set(preds[0]) >= {"id", "category", "raw", "calls", "valid", "error_type"}
    assert (repo / "models" / "sft" / "adapters.safetensors").exists()
    assert (repo / "reports" / "report.md").read_text().startswith("# Results")
    assert (repo / "reports" / "accuracy.png").stat().st_size > 1000
    assert json.loads((repo / "metrics" / "validate.json").read_text())["test"]["n_kept"] == 12
    assert "up to date" in run("dvc status", repo)


def test_changing_a_param_reruns_only_what_depends_on_it(repo):
    repo, _ = repo
    out = run("dvc exp run -S sft.lora_rank=4", repo)
    stages = ran_stages(out)
    assert {"train_sft", "eval@sft", "report"} <= stages
    assert not stages & {"fetch_bfcl", "fetch_model", "split", "validate", "eval@base"}
    diff = run("dvc metrics diff", repo)
    assert "metrics/train_sft.json" in diff and "trainable_parameters" in diff  # rank 8 -> 4 halves them
