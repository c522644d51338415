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
        for v in ("sft_dpo", "sft_rl"):
            train = stages[f"train_{v.removeprefix('sft_')}@{s}"]
            assert sft in train["deps"] and committed(train["outs"]) == [str(run_path("models", v, s))]
            assert f"--seed {s} " in train["cmd"]
        for v in ("sft", "sft_dpo", "sft_rl"):
            ev = stages[f"eval@{v}-{s}"]
            assert str(run_path("models", v, s)) in ev["deps"]
            assert committed(ev["outs"]) == [str(run_path("data/predictions", v, s, ".jsonl"))]
            assert list(ev["metrics"][0]) == [str(run_path("metrics/eval", v, s, ".json"))]
    main = {n for n in stages if n.split("@")[0] in ("train_sft", "train_dpo", "train_rl", "eval")}
    assert len(main) == 6 * len(seeds)
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
