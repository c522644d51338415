"""The checkout this package runs from: its root, and paths shown relative to it.

For what runs the repository's own scripts from outside the pipeline (the
serving acceptance check, bench) and records how: a recorded command or path
inside the repo is written repo-relative, so it repeats on any machine. And
``git``, for what reads or writes its history (the sweep report, ``chain``).
"""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shown(value, root=ROOT):
    """A path inside ``root`` as root-relative; anything else (other paths, other values) unchanged."""
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        try:
            return str(Path(value).resolve().relative_to(root))
        except ValueError:
            return str(value)
    return value


def git(*args, cwd="."):
    """``git *args`` run in ``cwd``: its stdout; a failing command raises ``CalledProcessError``."""
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout
