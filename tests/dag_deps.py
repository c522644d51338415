"""Each DVC stage's code deps, derived from what its script imports.

A stage's code deps are its script plus every ``toolcall`` module it imports,
transitively (imports inside functions too, and the package's ``__init__``,
which any ``toolcall.x`` import runs), plus the non-Python code such a module
builds and runs (``NATIVE``: the C++ kernels that ``toolcall/model/kernels.py``
compiles). ``stages/__init__.py``, which
``python -m stages.<name>`` also runs, is not counted: it holds a docstring
only (``tests/test_dag.py`` checks that). ``tests/test_dag.py`` fails when
``dvc.yaml`` lists other ``.py`` files; after moving code around, print the
right lists with

    python tests/dag_deps.py            # every stage: its code deps as dvc.yaml should list them
"""

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "toolcall"
# Module -> the non-Python code it builds and runs: a stage that imports it depends on that too.
NATIVE = {"toolcall/model/kernels.py": ("native",)}
# `python -m stages.eval ...` or `python stages/eval.py ...`: the stage's script.
SCRIPT = re.compile(r"python\s+(?:-m\s+stages\.(\w+)|stages/(\w+)\.py)")


def module_file(name, root=ROOT):
    """The file of a dotted module name inside the repo, or None (a class, a function, a third-party module)."""
    path = root.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path, root=ROOT):
    """Dotted names of the repo modules one file imports (anywhere in it), parents included."""
    rel = path.relative_to(root).with_suffix("")
    package = rel.parts[:-1]  # a/b.py and a/__init__.py both live in package a
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from . import x` is relative to the file's package; each extra dot goes one up.
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            if node.module:
                base += node.module.split(".")
            module = ".".join(base)
            names.append(module)
            # `from toolcall import config` imports the module toolcall.config.
            names += [f"{module}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != PACKAGE:
            continue
        for i in range(1, len(parts) + 1):  # importing a.b runs a/__init__.py first
            if module_file(".".join(parts[:i]), root):
                found.add(".".join(parts[:i]))
    return found


def code_closure(script, root=ROOT):
    """The script plus every repo module it reaches through imports (and their ``NATIVE`` code), repo-relative."""
    seen, todo = set(), [Path(script)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [module_file(m, root) for m in imported_modules(path, root)]
    modules = {p.relative_to(root).as_posix() for p in seen}
    return modules | {d for m in modules for d in NATIVE.get(m, ())}


def resolved_stages(root=ROOT):
    """``{stage name: stage dict}`` of dvc.yaml as DVC itself resolves it: every foreach and matrix expanded
    (``name@key``, ``name@a-b``) and ``${...}`` filled in from params.yaml (``${study.seeds}``).

    DVC's own resolver, so that the names and paths checked here are the ones ``dvc repro`` runs; it needs
    only dvc.yaml and params.yaml in ``root`` (no .dvc or git).
    """
    from dvc.parsing import DataResolver
    from dvc.repo import Repo

    repo = Repo(str(root), uninitialized=True)
    try:
        return DataResolver(repo, repo.root_dir, yaml.safe_load((root / "dvc.yaml").read_text())).resolve()["stages"]
    finally:
        repo.close()


def expanded_stages(root=ROOT):
    """``resolved_stages`` with each cmd on one line, single-spaced."""
    return {name: {**stage, "cmd": " ".join(stage["cmd"].split())} for name, stage in resolved_stages(root).items()}


def code_deps(root=ROOT):
    """``{stage: (listed code deps, derived code deps)}``: the code in dvc.yaml (``.py`` files and
    ``NATIVE`` directories) vs the imports."""
    native = {d for deps in NATIVE.values() for d in deps}
    out = {}
    for name, stage in expanded_stages(root).items():
        match = SCRIPT.search(stage["cmd"])
        if not match:
            raise ValueError(f"stage {name}: cannot find its script in cmd {stage['cmd']!r}")
        script = root / "stages" / f"{match.group(1) or match.group(2)}.py"
        listed = {d for d in stage.get("deps", []) if d.endswith(".py") or d in native}
        out[name] = (listed, code_closure(script, root))
    return out


def main():
    """Print each dvc.yaml stage's code deps (a foreach stage once, as its ``do`` lists them)."""
    derived, differs = {}, set()
    for name, (listed, closure) in code_deps().items():
        stage = name.split("@")[0]
        derived.setdefault(stage, set()).update(closure)
        if listed != closure:
            differs.add(stage)
    for stage, paths in derived.items():
        flag = "   # differs from dvc.yaml" if stage in differs else ""
        order = sorted(paths, key=lambda p: (not p.startswith("stages/"), not p.endswith(".py"), p))
        print(f"{stage}: [{', '.join(order)}]{flag}")

if __name__ == "__main__":
    sys.exit(main())
