"""Atomic file and directory writes, JSONL and params helpers: a crash never leaves half a file."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; move it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: some writers (mx.save_safetensors) append theirs otherwise.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path):
    """Yield an empty directory beside ``path``; it replaces ``path`` (whole) on success only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private
    try:
        yield tmp
        # rename(2) cannot overwrite a non-empty directory: the old one is first
        # moved aside, and deleted once the new one is in place.
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def parse_jsonl(text, where):
    """Rows of JSONL ``text``; a bad line is reported as ``where:line``."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def read_jsonl(path):
    """Rows of a JSONL file; a bad line is reported with its file and line number."""
    with open(path) as f:
        return parse_jsonl(f.read(), path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_params(section, path="params.yaml"):
    """One section of params.yaml (stages read only their own); dotted for a nested one: ``ablations.format.content``."""
    import yaml

    with open(path) as f:
        params = yaml.safe_load(f) or {}
    for key in section.split("."):
        if not isinstance(params, dict) or key not in params:
            raise KeyError(f"{path} has no [{section}] section")
        params = params[key]
    return params
