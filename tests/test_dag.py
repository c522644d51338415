"""dvc.yaml lists exactly the code each stage runs, derived from the scripts' imports (tests/dag_deps.py)."""

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from dag_deps import ROOT, SCRIPT, code_closure, code_deps, expanded_stages, resolved_stages
from toolcall.io import run_path


def test_every_stage_lists_exactly_its_script_and_imported_modules():
    wrong = []
    for stage, (listed, derived) in code_deps().items():
        if listed != derived:
            wrong.append(f"{stage}: missing {sorted(derived - listed)}, extra {sorted(listed - derived)}")
    assert not wrong, "dvc.yaml code deps disagree with the imports (run python tests/dag_deps.py):\n" + "\n".join(wrong)


def test_stages_package_init_has_no_code():
    """Every stage runs it, yet no stage lists it: it must stay a docstring."""
    body = ast.parse((ROOT / "stages" / "__init__.py").read_text()).body
    assert [type(node) for node in body] == [ast.Expr] and isinstance(body[0].value, ast.Constant)


def test_closure_follows_every_import_form(tmp_path):
    """from-imports of modules, relative imports (into a subpackage too), imports inside functions, the package __init__ and its imports."""
    files = {
        "toolcall/__init__.py": "from .model import blas\n",
        "toolcall/model/__init__.py": "",
        "toolcall/model/blas.py": "import os\n",
        "toolcall/a.py": "from .b import thing\n",
        "toolcall/b.py": "def thing():\n    from toolcall import c\n",
        "toolcall/c.py": "import json\n",
        "toolcall/unused.py": "",
        "stages/s.py": "import argparse\nfrom toolcall import a\n",
    }
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))
    assert code_closure(tmp_path / "stages/s.py", tmp_path) == {
        "stages/s.py", "toolcall/__init__.py", "toolcall/model/__init__.py", "toolcall/model/blas.py", "toolcall/a.py", "toolcall/b.py", "toolcall/c.py"}


def test_foreach_and_matrix_stages_are_expanded_and_checked():
    stages = code_deps(ROOT)
    assert {"eval_base", "eval@sft-0", "ablation_train_rl@unseen_tools", "ablation_eval@format_masked"} <= set(stages)
    listed, derived = stages["eval@sft-0"]
    assert "toolcall/stats.py" in derived and "toolcall/__init__.py" in derived  # the deps the issue found missing


def test_no_stage_cmd_has_two_spaces_in_a_row():
    """dvc.lock's YAML writer may break a long cmd at two spaces and reads one back: the stage would never be up to
    date (`dvc status`: changed command). An empty optional flag must not leave two spaces (see dvc.yaml)."""
    doubled = {name: stage["cmd"] for name, stage in resolved_stages(ROOT).items() if "  " in stage["cmd"]}
    assert not doubled


def committed(outs):
    """The paths of a stage's outs that git holds (``cache: false``), as written in dvc.yaml."""
    return [path for out in outs if isinstance(out, dict) for path, flags in out.items() if flags.get("cache") is False]


def test_every_seed_runs_the_main_study_on_its_own_sft_and_the_rest_uses_the_first():
    """The path scheme of io.run_path, per seed of study.seeds; ablations and exports on the first seed's runs.

    The main study's adapters and predictions are committed (cache: false), so a clone without the DVC
    cache can serve the tuned models and regenerate the reports.
    """
    seeds = yaml.safe_load((ROOT / "params.yaml").read_text())["study"]["seeds"]
    stages = expanded_stages(ROOT)
    assert committed(stages["eval_base"]["outs"]) == ["data/predictions/base.jsonl"]
    for s in seeds:
        sft = str(run_path("models", "sft", s))
        assert committed(stages[f"train_sft@{s}"]["outs"]) == [sft]
        assert f"--seed {s} " in stages[f"train_sft@{s}"]["cmd"]
        for v in ("sft_dpo", "sft_rl", "sft_grpo"):
            train = stages[f"train_{v.removeprefix('sft_')}@{s}"]
            assert sft in train["deps"] and committed(train["outs"]) == [str(run_path("models", v, s))]
            assert f"--seed {s} " in train["cmd"]
        for v in ("sft", "sft_dpo", "sft_rl", "sft_grpo"):
            ev = stages[f"eval@{v}-{s}"]
            assert str(run_path("models", v, s)) in ev["deps"]
            assert committed(ev["outs"]) == [str(run_path("data/predictions", v, s, ".jsonl"))]
            assert list(ev["metrics"][0]) == [str(run_path("metrics/eval", v, s, ".json"))]
    main = {n for n in stages if n.split("@")[0] in ("train_sft", "train_dpo", "train_rl", "train_grpo", "eval")}
    assert len(main) == 8 * len(seeds)
    # GRPO is [rl] with [grpo]'s keys in place: the one stage that reads [grpo].
    readers = {n.split("@")[0] for n, stage in stages.items() if "grpo" in stage.get("params", [])}
    assert readers == {"train_grpo"} and all("--overrides grpo" in stages[f"train_grpo@{s}"]["cmd"] for s in seeds)
    first = seeds[0]
    assert str(run_path("models", "sft", first)) in stages["ablation_best_of_n@sft"]["deps"]
    assert str(run_path("data/predictions", "sft", first, ".jsonl")) in stages["ablation_repair@sft"]["deps"]
    for v in ("sft", "sft_dpo", "sft_rl"):
        assert str(run_path("models", v, first)) in stages[f"export@{v}"]["deps"]
    for name, stage in stages.items():
        if name.startswith("ablation_train"):  # and ablation_train_rl, ablation_train_extra
            assert f"--seed {first} " in stage["cmd"], name
        # The ablations run over more than one session: what their stages make is committed too,
        # but for the splits, which ablation_split rewrites in seconds, byte for byte.
        if name.startswith("ablation_") and not name.startswith("ablation_split"):
            outs = [out if isinstance(out, str) else next(iter(out)) for out in stage["outs"]]
            assert committed(stage["outs"]) == outs, name


def test_the_live_test_is_scored_by_every_run_the_test_split_is():
    """eval_live_base and eval_live@<variant>-<seed> are eval_base and eval@<variant>-<seed> on test_live,
    their outputs under metrics/eval_live/ and data/predictions_live/ in the same scheme, committed alike."""
    def live(path):
        return (path.replace("data/validated/dataset/test.parquet", "data/validated/dataset/test_live.parquet")
                .replace("metrics/eval/", "metrics/eval_live/").replace("data/predictions/", "data/predictions_live/"))

    stages = expanded_stages(ROOT)
    evals = [name for name in stages if name == "eval_base" or name.startswith("eval@")]
    assert len(evals) == 1 + 4 * len(yaml.safe_load((ROOT / "params.yaml").read_text())["study"]["seeds"])
    assert {name.replace("eval", "eval_live", 1) for name in evals} == {
        name for name in stages if name.startswith("eval_live")}
    for name in evals:
        test, on_live = stages[name], stages[name.replace("eval", "eval_live", 1)]
        assert on_live["deps"] == [live(d) for d in test["deps"]] and on_live["params"] == test["params"]
        assert on_live["outs"] == [{live(p): flags for p, flags in out.items()} for out in test["outs"]]
        assert on_live["metrics"] == [{live(p): flags for p, flags in m.items()} for m in test["metrics"]]
        (predictions,), (metrics,) = on_live["outs"][0], on_live["metrics"][0]
        assert on_live["cmd"] == (f"{test['cmd']} --test data/validated/dataset/test_live.parquet "
                                  f"--metrics {metrics} --predictions {predictions}")


def test_constrained_decoding_runs_on_every_run_of_the_test_split():
    """eval_constrained_base and eval_constrained@<variant>-<seed> decode eval_base's and eval@<variant>-<seed>'s
    items with the same model, paired with that run's predictions, without the baseline; their outputs under
    metrics/eval_constrained/ and data/predictions_constrained/ in the same scheme, committed alike, and read by
    report_post_sft. The ablation's arms (the same script) keep the baseline and their outputs."""
    def data(deps):
        return [d for d in deps if not d.startswith(("stages/", "toolcall/")) and d != "native"]

    stages = expanded_stages(ROOT)
    evals = [name for name in stages if name == "eval_base" or name.startswith("eval@")]
    columns = {name.replace("eval", "eval_constrained", 1) for name in evals}
    assert columns == {name for name in stages if name.startswith("eval_constrained")}
    report = stages["report_post_sft"]
    for name in evals:
        test, column = stages[name], stages[name.replace("eval", "eval_constrained", 1)]
        (greedy,), (greedy_metrics,) = test["outs"][0], test["metrics"][0]
        predictions = greedy.replace("data/predictions/", "data/predictions_constrained/")
        metrics = greedy_metrics.replace("metrics/eval/", "metrics/eval_constrained/")
        assert column["cmd"] == (f"{test['cmd'].replace('stages.eval ', 'stages.eval_constrained ')} --test "
                                 f"data/validated/dataset/test.parquet --greedy {greedy} --metrics {metrics} "
                                 f"--predictions {predictions}")
        assert data(column["deps"]) == data(test["deps"]) + [greedy] and column["params"] == test["params"]
        assert column["outs"] == [{predictions: {"cache": False}}]
        assert column["metrics"] == [{metrics: {"cache": False}}]
        assert any(predictions == d or predictions.startswith(d + "/") for d in report["deps"])
    assert "--constrained data/predictions_constrained" in report["cmd"]
    arms = {name: stage for name, stage in stages.items() if name.startswith("ablation_constrained@")}
    assert len(arms) == 4
    for name, stage in arms.items():
        arm = name.split("@")[1]
        assert stage["cmd"].startswith(f"python -m stages.eval_constrained {arm} ") and stage["cmd"].endswith(
            f" --metrics metrics/ablations/constrained/{arm}.json "
            f"--predictions data/ablations/constrained/{arm}.jsonl --baseline")
        assert stage["outs"] == [{f"data/ablations/constrained/{arm}.jsonl": {"cache": False}}]


def test_stage_cmds_run_the_workspace_toolcall(tmp_path):
    """A copy of the repo (as `dvc exp run --queue` makes under .dvc/tmp/exps/) runs its own code.

    Each stage's cmd runs as DVC runs it: through the shell, from the repo root,
    with no PYTHONPATH. The copy's toolcall stops at import, printing its own path;
    an editable install of another checkout, or the tests' own path, must not win.
    """
    copy = tmp_path / "exp"
    for item in ("stages", "toolcall", "native", "dvc.yaml", "params.yaml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / item)
    with open(copy / "toolcall" / "__init__.py", "a") as f:
        f.write('\nraise SystemExit("toolcall from " + __file__)\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    scripts = {}
    for stage, spec in expanded_stages(copy).items():
        scripts.setdefault(SCRIPT.search(spec["cmd"]).groups(), (stage, spec["cmd"]))
    assert len(scripts) == len(list((ROOT / "stages").glob("[a-z]*.py")))  # every stage script is exercised
    for stage, cmd in scripts.values():
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path / "exp", env=env, capture_output=True, text=True)
        assert proc.stderr.strip() == f"toolcall from {copy / 'toolcall' / '__init__.py'}", (stage, proc.stderr)


def test_composed_rows_come_from_training_and_join_it_only_in_validate():
    """compose reads the split's training side only and every [compose] key but use; validate reads its rows and
    compose.use, so switching use reruns validate (and what trains on it), never compose."""
    stages = expanded_stages(ROOT)
    compose, validate = stages["compose"], stages["validate"]
    keys = yaml.safe_load((ROOT / "params.yaml").read_text())["compose"]
    data = [d for d in compose["deps"] if d.startswith("data/")]
    assert data == ["data/split/train.jsonl"]
    assert set(compose["params"]) == {f"compose.{k}" for k in keys if k != "use"} | {"validate.max_seq_len"}
    assert compose["outs"] == ["data/compose/composed.jsonl"]
    assert "compose.use" in validate["params"] and "data/compose/composed.jsonl" in validate["deps"]
    assert validate["cmd"].endswith(" --composed data/compose/composed.jsonl")
