"""Data-parallel training: the stage as one rank per core (a CPU), or one process (a GPU).

On a CPU, MLX's element-wise and reduction kernels run on one thread, so one
training process leaves the other cores idle between matmuls (``make bench``,
ops section). A training stage with params ``ranks: R > 1`` therefore runs as
R processes (``ensure_ranks``): each trains on its share of every batch, with
OpenBLAS held to its share of the cores, and the gradients are averaged
across them before each update (mlx-lm's trainer does this for SFT;
``trainer.optimize`` for DPO and GRPO). The processes talk through MLX's
``ring`` backend on loopback, the same backend ``mlx.launch`` starts across
several machines (README, "Several machines"). On Metal or CUDA the stage
stays one process: one process already has the whole device.

Why not ``mlx.launch`` here too: it exits 0 when a rank fails (mlx 0.32.4,
checked), so DVC would record a failed stage as done. The launcher below sets
what ``mlx.launch --backend ring`` sets (``MLX_RANK``, ``MLX_HOSTFILE``), exits
with the first failing rank's status after stopping the others (they would
wait for it forever in the next all-reduce), and on Linux the ranks die with
it (``kill -9`` of the stage leaves no rank behind).

Rank 0 alone writes outputs, metrics, dvclive logs and checkpoints (``is_main``)
and prints progress: the other ranks' stdout is dropped, and their stderr is
shown only when one of them fails while rank 0 has nothing to say.

The rank count is a param, never the machine's core count: it changes the
order of floating-point sums, so the same params must give the same ranks
(and bytes) on every machine. Losses are normalized so that R ranks compute
the same loss as one process on the same global batch (``token_mean``;
``tests/test_launch.py``).
"""

import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from toolcall import resources
from toolcall.errors import UserError

# What ``agree`` tells the user when ranks computed different things.
SAME_EVERYWHERE = ("every host must run the same mlx and mlx-lm versions, code, data, model and params "
                   "(README, Several machines)")
RANK_ENV = "MLX_RANK"  # set by mlx.launch and by run_ranks for each rank
LAUNCHER_ENV = "TOOLCALL_LAUNCHER_PID"  # set by run_ranks only: the parent to die with


def world():
    """MLX's global group: this run's ranks (a group of one in a plain process)."""
    return mx.distributed.init()


def rank():
    return world().rank()


def size():
    return world().size()


def is_main():
    """The one rank that writes outputs, checkpoints and logs."""
    return rank() == 0


def ensure_ranks(ranks, section):
    """Make this process one of ``ranks`` data-parallel ranks; return in each rank.

    Called by a training stage once its params are read, before anything slow.
    In a plain process on a CPU with ``ranks > 1`` it starts the ranks (the
    same command line) and exits with their status; ``ranks == 1`` or a GPU:
    returns at once (one process). Under a launcher (``run_ranks``,
    ``mlx.launch``) the run's rank count must equal ``ranks`` (params
    ``[section].ranks``): otherwise the same params would give other bytes.
    """
    if RANK_ENV in os.environ:
        _die_with_launcher()
        if size() != ranks:
            raise UserError(f"params.yaml [{section}].ranks={ranks} but this run has {size()} ranks "
                            f"(its hostfile); set {section}.ranks={size()} or launch {ranks}")
        return
    if ranks == 1:
        return
    if resources.gpu_default():
        print(f"[{section}] ranks={ranks}: MLX computes on a GPU here, so one process trains", flush=True)
        return
    sys.exit(run_ranks(ranks, [sys.executable, *sys.orig_argv[1:]]))


def run_ranks(n, command):
    """Run ``command`` as ``n`` ranks on this machine (ring backend, loopback); its exit status.

    Each rank gets an equal share of the usable cores for OpenBLAS. The first
    rank to fail stops the others; its status is returned (128 + signal for
    a rank killed by a signal, as a shell reports it).
    """
    threads = max(1, resources.usable_cores() // n)
    with tempfile.TemporaryDirectory(prefix="toolcall-ranks-") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in _free_ports(n)]))
        procs, errs = [], []
        for r in range(n):
            env = dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile), OPENBLAS_NUM_THREADS=str(threads),
                       **{LAUNCHER_ENV: str(os.getpid())})
            errs.append(None if r == 0 else open(Path(tmp) / f"rank{r}.err", "w+"))
            # Their own process group: a Ctrl-C reaches them once, forwarded below, not twice.
            procs.append(subprocess.Popen(command, env=env, stdout=None if r == 0 else subprocess.DEVNULL,
                                          stderr=errs[r], start_new_session=True))
        forward = lambda sig, _: [p.send_signal(sig) for p in procs if p.poll() is None]  # noqa: E731
        before = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            failed = _wait(procs)
            # Rank 0's stderr is already on ours. Another rank's is shown only when rank 0 said
            # nothing of its own (it succeeded, or was killed here): else the message would be twice.
            if failed and procs[0].returncode in (0, -signal.SIGKILL):
                errs[failed].seek(0)
                sys.stderr.write(errs[failed].read())
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
            for err in errs[1:]:
                err.close()
        if failed is None:
            return 0
        code = procs[failed].returncode
        return 128 - code if code < 0 else code


def _wait(procs, grace=3.0):
    """Wait for every rank; after the first failure, ``grace`` seconds for the others to end on their
    own (a Ctrl-C or the same bad input ends them all), then kill the rest. The failing rank, or None."""
    while True:
        codes = [p.poll() for p in procs]
        failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None:
            deadline = time.monotonic() + grace
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            return failed
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.1)


def _free_ports(n):
    """``n`` loopback ports free right now, so runs side by side (a DVC queue) do not collide."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_launcher():
    """Under ``run_ranks`` on Linux: die when the launcher dies, even by ``kill -9``."""
    parent = os.environ.get(LAUNCHER_ENV)
    if parent is None or sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before the line above took effect
        os._exit(1)


# ---------------------------------------------------------------- inside the ranks


def shard(items):
    """This rank's share of a batch: every ``size()``-th item from its rank, as mlx-lm's trainer splits batches."""
    return items[rank()::size()]


def token_mean(total, count):
    """``total / count`` in one process; under R ranks, R x this rank's ``total`` / the ranks' summed ``count``.

    The gradient all-reduce and the logged values average the ranks, so each
    rank's share is scaled to make that average the mean over every rank's
    tokens: the loss one process computes on the whole batch, whatever the
    split of tokens between the ranks.
    """
    n = size()
    if n == 1:
        return total / count
    return total * n / mx.stop_gradient(mx.distributed.all_sum(count))


def mean_over_ranks(tree):
    """Every array of ``tree`` averaged over the ranks (unchanged in one process): the values to log."""
    n = size()
    if n == 1:
        return tree
    return tree_map(lambda x: mx.distributed.all_sum(x, stream=mx.cpu) / n, tree)


def share(fn, items):
    """``fn(items)``, each rank computing ``fn`` of its contiguous block of ``items``; every rank gets the whole.

    For the work each rank would otherwise repeat in full (sampling, scoring
    with the frozen model): ``fn`` maps a list to a list of the same length,
    item by item. Contiguous blocks keep neighbours (a prompt's pairs)
    together. The blocks travel pickled: ranks run the same code (``agree``
    checks what must match).
    """
    n = size()
    if n == 1:
        return fn(items)
    bounds = [len(items) * r // n for r in range(n + 1)]
    mine = fn(items[bounds[rank()]:bounds[rank() + 1]])
    blob = np.frombuffer(pickle.dumps(mine), np.uint8)
    lengths = np.array(mx.distributed.all_gather(mx.array([blob.size], mx.int64), stream=mx.cpu))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:blob.size] = blob
    every = np.array(mx.distributed.all_gather(mx.array(padded), stream=mx.cpu)).reshape(n, -1)
    out = []
    for r in range(n):
        out += pickle.loads(every[r, :int(lengths[r])].tobytes())
    return out


def agree(data, what, fix):
    """Raise a ``UserError`` unless every rank holds the same ``data`` (bytes).

    For what each rank computes for itself and all must share (samples,
    pairs, the checkpoint step): ranks on hosts with other library versions
    or other CPUs can compute other samples and would then train on a
    mixture of them silently.
    """
    if size() == 1:
        return
    digest = mx.array(np.frombuffer(hashlib.sha256(data).digest(), np.uint8))
    every = np.array(mx.distributed.all_gather(digest, stream=mx.cpu)).reshape(size(), -1)
    if (every != every[0]).any():
        raise UserError(f"the {size()} ranks disagree on {what}; {fix}")
