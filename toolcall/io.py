"""Atomic file and directory writes and JSONL helpers: a crash never leaves half a file.

A write that fails (disk full, no permission) or is interrupted leaves the
file as it was before, and is reported as one ``WriteError`` naming the path.
"""

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from toolcall.errors import DataError, WriteError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; move it into place on success."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths):
    """Several outputs that land together: each is moved into place only after all were written.

    A stage with two outputs (predictions and metrics) never leaves one new and
    one old when it fails or is interrupted while writing.
    """
    with ExitStack() as stack:
        tmps = [stack.enter_context(_temporary_beside(Path(p))) for p in paths]
        yield tmps
        for tmp, path in zip(tmps, paths):
            _move(tmp, Path(path))


@contextmanager
def _temporary_beside(path):
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the suffix: some writers (mx.save_safetensors) append theirs otherwise.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        yield Path(tmp)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path):
    """Yield an empty directory beside ``path``; it replaces ``path`` (whole) on success only."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from e
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private
    try:
        yield tmp
        if path.exists() and _exchange(tmp, path):
            return  # tmp now holds the old tree, removed below
        # rename(2) cannot overwrite a non-empty directory: without an exchange the
        # old one is first moved aside (for an instant nothing is at ``path``), and
        # deleted once the new one is in place.
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=ASIDE_SUFFIX, dir=path.parent))
            os.replace(path, old)
        _move(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ASIDE_SUFFIX = ".old"


def set_aside(path):
    """The previous trees of directory ``path`` that ``atomic_dir``'s fallback moved aside and a kill left
    there (``.<name>.*.old`` beside it), oldest first."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{ASIDE_SUFFIX}"), key=lambda p: p.stat().st_mtime)


# One system call that swaps two paths, so a reader or a kill never finds ``path``
# absent: Linux renameat2(RENAME_EXCHANGE), macOS renamex_np(RENAME_SWAP); both flags are 2.
_AT_FDCWD = -100
_SWAP = 2
_LIBC = ctypes.CDLL(None, use_errno=True)
_EXCHANGE = getattr(_LIBC, "renameat2" if sys.platform.startswith("linux") else "renamex_np", None)
# The kernel or filesystem that cannot swap (e.g. Linux < 3.15, some network mounts).
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _exchange(a, b):
    """Swap paths ``a`` and ``b`` atomically: True, or False where this system cannot."""
    if _EXCHANGE is None:
        return False
    names = os.fsencode(a), os.fsencode(b)
    if sys.platform.startswith("linux"):
        failed = _EXCHANGE(_AT_FDCWD, names[0], _AT_FDCWD, names[1], _SWAP)
    else:
        failed = _EXCHANGE(*names, _SWAP)
    if not failed:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise _write_error(Path(b), OSError(err, os.strerror(err)))


def _move(tmp, path):
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from e


def _write_error(path, e):
    if e.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir met a file where a directory should be
        return WriteError(f"cannot write {path}: a file is in the way of its directory {path.parent}; "
                          "move that file away and rerun")
    return WriteError(f"cannot write {path}: {e.strerror or e}; "
                      "free space or fix permissions there and rerun (earlier outputs are unchanged)")


def write_text(path, text):
    write_texts({path: text})


def write_texts(files):
    """Write ``{path: text}``: every file lands, or none does (see ``atomic_paths``)."""
    with atomic_paths(list(files)) as tmps:
        for tmp, text in zip(tmps, files.values()):
            tmp.write_text(text)


def json_text(obj):
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def jsonl_text(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_json(path, obj):
    write_text(path, json_text(obj))


def write_jsonl(path, rows):
    write_text(path, jsonl_text(rows))


def parse_jsonl(text, where, fix="fix or regenerate the file (dvc repro) and rerun"):
    """Rows of JSONL ``text``; a bad line is a ``DataError`` naming ``where:line`` and ``fix``."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{lineno}: not valid JSON ({e.msg}); {fix}") from None
    return rows


def read_jsonl(path):
    """Rows of a JSONL file; a bad line is reported with its file and line number."""
    with _open_input(path) as f:
        return parse_jsonl(f.read(), path)


def read_json(path):
    with _open_input(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); "
                            "fix or regenerate the file (dvc repro) and rerun") from None


def _open_input(path):
    try:
        return open(path)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; run the stage that makes it (dvc repro) "
                        "or check the path") from None


TIMINGS_SUFFIX = ".timings.json"


def timings_path(metrics_path):
    """Where a stage's wall-clock numbers go: beside its metrics, as ``<name>.timings.json``.

    Kept out of the metrics on purpose: they differ from run to run, so in a
    DVC output they would change ``dvc.lock`` and ``dvc metrics diff`` on every
    identical rerun. Git and DVC ignore them (``.gitignore``, ``.dvcignore``).
    """
    path = Path(metrics_path)
    return path.with_name(path.stem + TIMINGS_SUFFIX)


def write_timings(metrics_path, timings):
    write_json(timings_path(metrics_path), timings)


def run_path(root, variant, seed, suffix=""):
    """Where one run of a variant lives under ``root`` (the main study's path scheme, dvc.yaml).

    A variant trained once per seed of ``study.seeds`` has one entry per
    seed, ``<root>/<variant>/s<seed><suffix>`` (models/sft/s0,
    metrics/eval/sft_dpo/s1.json, data/predictions/sft_rl/s2.jsonl); a run
    with no seed (``seed`` None: the base model's greedy eval) is
    ``<root>/<variant><suffix>``.
    """
    return Path(root, f"{variant}{suffix}") if seed is None else Path(root, variant, f"s{seed}{suffix}")
