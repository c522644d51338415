"""dvc.yaml lists exactly the code each stage runs, derived from the scripts' imports (tests/dag_deps.py)."""

import textwrap

from dag_deps import ROOT, code_closure, code_deps


def test_every_stage_lists_exactly_its_script_and_imported_modules():
    wrong = []
    for stage, (listed, derived) in code_deps().items():
        if listed != derived:
            wrong.append(f"{stage}: missing {sorted(derived - listed)}, extra {sorted(listed - derived)}")
    assert not wrong, "dvc.yaml code deps disagree with the imports (run python tests/dag_deps.py):\n" + "\n".join(wrong)


def test_closure_follows_every_import_form(tmp_path):
    """from-imports of modules, relative imports, imports inside functions, the package __init__ and its imports."""
    files = {
        "toolcall/__init__.py": "from . import blas\n",
        "toolcall/blas.py": "import os\n",
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
        "stages/s.py", "toolcall/__init__.py", "toolcall/blas.py", "toolcall/a.py", "toolcall/b.py", "toolcall/c.py"}


def test_foreach_stages_are_expanded_and_checked():
    stages = code_deps(ROOT)
    assert {"eval@sft", "ablation_train_rl@unseen_tools", "ablation_eval@format_masked"} <= set(stages)
    listed, derived = stages["eval@sft"]
    assert "toolcall/stats.py" in derived and "toolcall/__init__.py" in derived  # the deps the issue found missing
