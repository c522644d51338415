"""toolcall.serve.acceptance (make serving) end to end on the tiny model, through the real stage scripts.

In a scratch project: the tiny model fine-tuned to answer one request with two
calls (tiny_adapter) is shipped as a GGUF in a wheel like the real base, fetched,
given a LoRA adapter, evaluated by stages/eval.py and exported by
stages/export.py; then the acceptance check runs all three parts.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_adapter import FUNCTIONS, MESSAGES, train_lora_adapter, train_tool_caller
from tiny_model import make_tiny_model

from toolcall.io import write_jsonl
from toolcall.model.fetch import fetch_model
from test_data import fixture_rows
from test_modelio import write_gguf, write_wheel

ROOT = Path(__file__).resolve().parent.parent
TINY_ROW = {"id": "tiny_0", "category": "parallel", "messages": MESSAGES, "functions": FUNCTIONS,
            "ground_truth": [{"get_weather": {"city": ["Paris"], "unit": ["celsius"]}},
                             {"get_weather": {"city": ["Rome"], "unit": ["celsius"]}}]}


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("project")
    env = {**os.environ, "TOOLCALL_CACHE": str(tmp / "cache")}
    tuned, _ = train_tool_caller(make_tiny_model(tmp / "random"), tmp / "tuned")
    model_cfg = write_wheel(tmp / "cache", write_gguf(tmp / "tiny.gguf", tuned))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLCALL_CACHE", env["TOOLCALL_CACHE"])
        fetch_model(model_cfg, tmp / "models/base")
    # A small update on top: the adapter changes the weights, the tuned answer survives it.
    train_lora_adapter(tmp / "models/base", tmp / "models/sft/s3", steps=2, learning_rate=1e-4)
    (tmp / "params.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(model_cfg),
                                                    "eval": {"max_tokens": 128, "batch_size": 4, "workers": 1},
                                                    "study": {"seeds": [3, 4]}}))  # the first seed is exported
    rows = [TINY_ROW] + [r for r in fixture_rows() if r["category"] == "simple"][:1]
    write_jsonl(tmp / "data/validated/test.jsonl", rows)
    py = sys.executable
    run([py, ROOT / "stages/eval.py", "sft/s3", "--model", "models/base", "--adapter", "models/sft/s3",
         "--test", "data/validated/test.jsonl", "--workers", "1"], tmp, env)
    run([py, ROOT / "stages/export.py", "sft", "--model", "models/base", "--adapter", "models/sft/s3",
         "--out", "models/export/sft", "--gguf-dtype", "float32"], tmp, env)
    run([py, "-m", "toolcall.serve.acceptance", "--items", "2", "--gguf-prompts", "2", "--workers", "1"], tmp, env)
    return tmp


def test_served_fused_and_gguf_agree_with_eval(project):
    result = json.loads((project / "metrics/serving.json").read_text())
    served, fused, gguf = result["served"], result["fused"], result["gguf"]
    assert (result["variant"], result["seed"]) == ("sft", 3) and "models/sft/s3" in served["command"]
    assert served["n"] == 2 and served["tool_calls_equal"] == 2 and served["items_with_calls"] >= 1
    predictions = [json.loads(line) for line in (project / "data/predictions/sft/s3.jsonl").read_text().splitlines()]
    assert predictions[0]["valid"]  # eval scored the tuned answer correct: the comparison is not of empty lists
    assert fused["n"] == 2 and fused["outputs_identical"] == 2 and fused["correct_minus_eval_correct"] == 0
    # The recorded command repeats anywhere: no path of this machine in it.
    assert fused["command"].startswith("stages/eval.py sft_export ")
    assert "<tmp>/export_predictions.jsonl" in fused["command"]
    assert gguf["summary"] | {"max_abs_logit_diff": 0, "max_abs_logit_diff_vs_float32": 0} == {
        "n": 2, "template_equal": 2, "tokens_equal": 2, "argmax_equal": 2,
        "max_abs_logit_diff": 0, "max_abs_logit_diff_vs_float32": 0}
    assert all(gguf["tokenizer_metadata_equal_to_base_gguf"].values())
