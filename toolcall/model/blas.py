"""Point MLX's CPU matmuls at OpenBLAS on Linux.

The Linux ``mlx[cpu]`` wheel bundles netlib's reference BLAS, a few percent
of the speed of an optimized one. Loading OpenBLAS into the global symbol
scope *before* ``mlx.core`` is imported makes MLX's ``sgemm`` calls resolve to
it (``make bench`` measures the difference).
On macOS MLX uses Accelerate, so this is a no-op there.
"""

import contextlib
import ctypes
import ctypes.util
import os
import sys
import warnings

# Debian/Ubuntu's libopenblas0-pthread; TOOLCALL_OPENBLAS overrides.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)

loaded_path = None
_lib = None
# Other per-process thread pools that ``threads`` limits too: functions
# n -> the previous count (None: nothing to restore). ``kernels`` adds its own.
thread_setters = []


def load_openblas():
    """Load OpenBLAS globally; return its path, or None where not applicable."""
    global loaded_path, _lib
    if loaded_path or sys.platform != "linux" or os.environ.get("TOOLCALL_NO_OPENBLAS"):
        return loaded_path
    if "mlx.core" in sys.modules:
        warnings.warn("mlx.core was imported before toolcall: OpenBLAS cannot take effect")
        return None
    paths = [os.environ.get("TOOLCALL_OPENBLAS"), *_CANDIDATES, ctypes.util.find_library("openblas")]
    for path in filter(None, paths):
        try:
            _lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError:
            continue
        loaded_path = path
        return path
    warnings.warn(
        "OpenBLAS not found: MLX on Linux CPU will run ~30-50x slower. "
        "Install Debian's libopenblas0-pthread (make does this as root)."
    )
    return None


@contextlib.contextmanager
def threads(n):
    """OpenBLAS (and each of ``thread_setters``) limited to ``n`` threads inside the block (``None``: unchanged).

    For work that already runs one lane per core: more threads per lane
    would only oversubscribe the cores.
    """
    if n is None:
        yield
        return
    before = _lib.openblas_get_num_threads() if _lib is not None else None
    if before is not None:
        _lib.openblas_set_num_threads(n)
    restore = [(setter, setter(n)) for setter in thread_setters]
    try:
        yield
    finally:
        if before is not None:
            _lib.openblas_set_num_threads(before)
        for setter, previous in restore:
            if previous is not None:
                setter(previous)
