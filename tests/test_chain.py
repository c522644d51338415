"""toolcall.chain on a small git + DVC repository: one commit a stage, of that stage's files only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WRITE = "python -c \"import sys; open(sys.argv[1], 'w').write(sys.argv[2])\""


def sh(repo, *args, check=True):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1")
    return subprocess.run(args, cwd=repo, capture_output=True, text=True, env=env, check=check, timeout=300)


@pytest.fixture
def repo(tmp_path):
    stages = {
        "a": {"cmd": f"{WRITE} a.json 1 && {WRITE} big.bin data", "outs": [{"a.json": {"cache": False}}, "big.bin"]},
        "b": {"cmd": f"{WRITE} b.json 2", "deps": ["a.json"], "outs": [{"b.json": {"cache": False}}]},
        "broken": {"cmd": f"{WRITE} c.json 3 && exit 1", "outs": [{"c.json": {"cache": False}}]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "notes.txt").write_text("first\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "start"]):
        sh(tmp_path, *cmd)
    return tmp_path


def commits(repo):
    return sh(repo, "git", "log", "--format=%s").stdout.splitlines()


def files_of(repo, rev):
    return set(sh(repo, "git", "show", "--name-only", "--format=", rev).stdout.split())


def test_each_stage_is_committed_alone_with_its_outputs_and_the_lock(repo):
    (repo / "notes.txt").write_text("edited while the chain runs\n")
    sh(repo, sys.executable, "-m", "toolcall.chain", "a", "b")
    assert commits(repo)[:2] == ["b: dvc repro --single-item b", "a: dvc repro --single-item a"]
    # a's cache:false output, the lock, and the .gitignore DVC wrote for its cached output
    assert files_of(repo, "HEAD~1") == {"a.json", "dvc.lock", ".gitignore"}
    assert files_of(repo, "HEAD") == {"b.json", "dvc.lock"}
    assert sh(repo, "git", "status", "--porcelain").stdout.split() == ["M", "notes.txt"]  # left as it was
    assert "big.bin" in (repo / ".gitignore").read_text() and "big.bin" not in files_of(repo, "HEAD~1")

    sh(repo, sys.executable, "-m", "toolcall.chain", "a")  # up to date: no empty commit
    assert len(commits(repo)) == 3


def test_the_chain_stops_at_a_failed_stage_and_keeps_what_finished(repo):
    proc = sh(repo, sys.executable, "-m", "toolcall.chain", "a", "broken", "b", check=False)
    assert proc.returncode != 0 and "chain: broken failed; the stages before it are committed" in proc.stderr
    assert commits(repo) == ["a: dvc repro --single-item a", "start"]  # b never ran
    assert not (repo / "b.json").exists()


def test_an_unknown_stage_is_refused_before_anything_runs(repo):
    proc = sh(repo, sys.executable, "-m", "toolcall.chain", "a", "nope", check=False)
    assert proc.returncode != 0 and "chain: 'nope': Stage 'nope' not found" in proc.stderr
    assert commits(repo) == ["start"] and not (repo / "a.json").exists()
