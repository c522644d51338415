"""Repro section: the wall time of a no-op ``dvc repro`` (every stage cached).

    python -m bench.repro [--repeats 3] [--repro-dir .] [--out metrics/bench.json]

On the real pipeline when ``--repro-dir`` holds a finished, clean one (and no
``dvc repro`` is running there); otherwise on a tiny-model copy of the DAG
built the way tests/pipeline_repo.py builds it.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # python bench/repro.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, f, log, met, rate_stats, ratio, run_worker, section_main, shown


def worker_tiny_model(spec):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import make_tiny_model

    return {"path": str(make_tiny_model(spec["out"]))}


def dvc_env(repo):
    bindir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(repo))


def run_cmd(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"{cmd} in {cwd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def pipeline_busy(repo):
    """A `dvc` process whose working directory is ``repo``?"""
    repo = Path(repo).resolve()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            is_dvc = any(Path(a).name == "dvc" for a in argv[:2]) and "repro" in argv
            if is_dvc and Path(os.readlink(f"/proc/{pid}/cwd")).resolve() == repo:
                return True
        except OSError:
            continue
    return False


def build_tiny_repo(where):
    """The end-to-end tests' recipe (tests/pipeline_repo.py): the DAG on a tiny model and fixture data."""
    repo = where / "repo"
    repo.mkdir(parents=True)
    tiny = run_worker("repro", "tiny_model", {"out": str(where / "tiny")})["path"]
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import pipeline_repo  # its recipe: code, tiny model and fixture data, every later stage tiny
    finally:
        sys.path.remove(str(ROOT / "tests"))
    pipeline_repo.write_tiny_repo(repo, tiny)
    env = dvc_env(repo)
    run_cmd("git init -q && git config user.email b@b && git config user.name bench && dvc init -q"
            " && git add -A && git commit -qm init", repo, env)
    t = time.perf_counter()
    run_cmd("dvc repro", repo, env)
    full = time.perf_counter() - t
    run_cmd("git add -A && git commit -qm repro", repo, env)
    return repo, full


def noop_repro(args):
    target = Path(args.repro_dir).resolve()
    where, full, note = None, None, None
    if (target / "dvc.lock").exists() and not pipeline_busy(target):
        status = run_cmd("dvc status", target, dvc_env(target), check=False)
        if "up to date" in status:
            where, note = target, "the real pipeline (everything cached)"
        else:
            note = f"{shown(target)}: dvc status is not clean, so a repro there would run stages"
    elif (target / "dvc.lock").exists():
        note = f"{shown(target)}: a dvc repro is running there"
    else:
        note = f"{shown(target)}: no dvc.lock (pipeline never run there)"
    tmp = None
    if where is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-repro-"))
        log(f"no-op repro: {note}; building the tiny-model copy of the DAG in {tmp}")
        where, full = build_tiny_repo(tmp)
        note = f"tiny-model copy of the DAG (tests/pipeline_repo.py recipe) after one full repro; {note}"
    try:
        env, times = dvc_env(where), []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = run_cmd("dvc repro", where, env)
            times.append(time.perf_counter() - t)
            if "Running stage" in out:
                raise RuntimeError(f"dvc repro in {where} was not a no-op:\n{out[-2000:]}")
        t = time.perf_counter()
        run_cmd("dvc --version", where, env)
        startup = time.perf_counter() - t
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"where": note, "seconds": rate_stats(times), "dvc_startup_s": startup, "full_repro_s": full}


WORKERS = {"tiny_model": worker_tiny_model}


def add_args(ap):
    ap.add_argument("--repro-dir", default=str(ROOT),
                    help="time the no-op repro here if its pipeline is finished and clean; else in a tiny copy")


def run(args, params):
    try:
        out = noop_repro(args)
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:  # report, keep the other sections' rows
        log(f"no-op repro failed: {str(e)[-500:]}")
        return {"noop_repro": {"error": str(e)[-3000:]}}
    return {"noop_repro": out, "noop_repro_s": out["seconds"]["median"]}


def rows(r):
    if "noop_repro_s" not in r:
        return []
    return [("no-op dvc repro seconds vs the 5 s target", f(r["noop_repro_s"], 2), "5.00", ratio(r["noop_repro_s"], 5),
             f"target <5s: {met(r, 'noop_repro_lt_5s')}"),
            (f"  where: {r['noop_repro']['where'][:70]}", "", "", "",
             f"dvc startup alone {r['noop_repro']['dvc_startup_s']:.2f}s")]


if __name__ == "__main__":
    section_main(sys.modules[__name__])
