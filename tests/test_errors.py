"""Bad input gets one clear line and a non-zero exit; outputs of an earlier run are never lost.

Stage-level cases run the stage as DVC does (``python -m stages.<name>``, the
params file in the working directory) and check what the user sees: exit
status 1 (130 for Ctrl-C), the last stderr line ``<stage>: <message>`` naming
the file / row and what to do, and no traceback.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tiny_model import make_tiny_model
from toolcall import io, wheels
from toolcall.errors import DataError, UserError, WriteError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bfcl"
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def stage(name, *args, cwd, params=None, **popen):
    """Run a stage from ``cwd`` (holding its params.yaml) with the repo's code; return the process."""
    params = {**PARAMS, **(params or {})}
    (Path(cwd) / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", f"stages.{name}", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def one_line_error(proc, stage_name, status=1):
    """The message the user sees; fails unless the stage exited with ``status`` and one line, no traceback."""
    assert proc.returncode == status, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{stage_name}: "), proc.stderr
    return last


def bfcl_rows():
    """The normalized fixture rows (data/bfcl/<category>.jsonl as fetch_bfcl writes them), by category."""
    from toolcall.bfcl.sources import normalize, read_source

    raw = read_source("local", PARAMS["data"]["files"], local_dir=FIXTURE)
    return {cat: normalize(cat, q, a) for cat, (q, a) in raw.items()}


def write_bfcl(dir_, rows_by_cat):
    """data/bfcl as fetch_bfcl writes it: ``rows_by_cat``, and the fixture's extra sources under extra/."""
    from toolcall.bfcl.sources import read_extra

    dir_.mkdir(parents=True, exist_ok=True)
    for cat, rows in rows_by_cat.items():
        io.write_jsonl(dir_ / f"{cat}.jsonl", rows)
    extra = read_extra("local", PARAMS["data"]["extra_files"], list(PARAMS["data"]["extra_files"]),
                           local_dir=FIXTURE)
    for name, rows in extra.items():
        io.write_jsonl(dir_ / "extra" / f"{name}.jsonl", rows)
    return dir_


SPLIT = {"split": {**PARAMS["split"], "test_per_category": 3, "valid_per_category": 2}}


# ---- data files


def test_malformed_jsonl_row(tmp_path):
    bfcl = write_bfcl(tmp_path / "bfcl", bfcl_rows())
    path = bfcl / "parallel.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2] + "\n" + "".join(lines[5:]))
    msg = one_line_error(stage("split", bfcl, tmp_path / "out", tmp_path / "split.json", cwd=tmp_path, params=SPLIT), "split")
    assert msg.startswith(f"split: {path}:5: not valid JSON (") and "fix or regenerate" in msg
    assert not (tmp_path / "out").exists()


def test_row_missing_a_field(tmp_path):
    rows = bfcl_rows()
    del rows["multiple"][2]["functions"]
    bfcl = write_bfcl(tmp_path / "bfcl", rows)
    msg = one_line_error(stage("split", bfcl, tmp_path / "out", tmp_path / "split.json", cwd=tmp_path, params=SPLIT), "split")
    assert msg == (f"split: {bfcl / 'multiple.jsonl'}: row 3 (id {rows['multiple'][2]['id']}) lacks functions; "
                   "fix or regenerate the file (dvc repro)")


def test_duplicate_ids_across_files(tmp_path):
    rows = bfcl_rows()
    rows["parallel"][1]["id"] = rows["simple"][0]["id"]
    bfcl = write_bfcl(tmp_path / "bfcl", rows)
    msg = one_line_error(stage("split", bfcl, tmp_path / "out", tmp_path / "split.json", cwd=tmp_path, params=SPLIT), "split")
    assert msg == (f"split: {bfcl / 'parallel.jsonl'}: row 2: duplicate id {rows['simple'][0]['id']} "
                   f"(first in {bfcl / 'simple.jsonl'}: row 1); ids must be unique: remove or rename one")


def test_empty_split_file(tmp_path):
    (tmp_path / "test.jsonl").write_text("")
    # eval reads the test split before it loads any model: no model needed to fail here
    msg = one_line_error(stage("eval", "sft", "--model", tmp_path / "no-model", "--test", tmp_path / "test.jsonl",
                               cwd=tmp_path), "eval")
    assert msg == f"eval: {tmp_path / 'test.jsonl'}: no rows; rerun the stage that writes it (dvc repro) or fix its params"
    # and split refuses to write an empty side in the first place
    bfcl = write_bfcl(tmp_path / "bfcl", bfcl_rows())
    # every fixture row goes to test or validation, and no extra source fills training
    params = {"split": {**PARAMS["split"], "test_per_category": 11, "valid_per_category": 1},
              "data": {**PARAMS["data"], "extra": []}}
    msg = one_line_error(stage("split", bfcl, tmp_path / "out", tmp_path / "split.json", cwd=tmp_path, params=params), "split")
    assert msg == (f"split: the train split is empty (48 rows in {bfcl}); check split.test_per_category / "
                   "split.train_per_category and data.categories")
    assert not (tmp_path / "out").exists()


def test_missing_input_file(tmp_path):
    msg = one_line_error(stage("eval", "sft", "--model", tmp_path, "--test", tmp_path / "nope.jsonl", cwd=tmp_path),
                         "eval")
    assert msg == (f"eval: {tmp_path / 'nope.jsonl'} does not exist; run the stage that makes it (dvc repro) "
                   "or check the path")


def test_missing_and_truncated_local_bfcl_files(tmp_path):
    params = {"data": {**PARAMS["data"], "source": "local", "local_dir": str(tmp_path / "none")}}
    msg = one_line_error(stage("fetch_bfcl", tmp_path / "out", cwd=tmp_path, params=params), "fetch_bfcl")
    assert "BFCL_v4_simple_python.json does not exist (data.local_dir=" in msg and "fix data.local_dir" in msg
    src = shutil.copytree(FIXTURE, tmp_path / "bfcl")
    cut = src / "BFCL_v4_multiple.json"
    cut.write_bytes(cut.read_bytes()[:-40])  # a download cut short
    params["data"]["local_dir"] = str(src)
    msg = one_line_error(stage("fetch_bfcl", tmp_path / "out", cwd=tmp_path, params=params), "fetch_bfcl")
    assert msg.startswith(f"fetch_bfcl: {cut}:12: not valid JSON (") and "truncated or corrupt" in msg
    assert not (tmp_path / "out" / "multiple.jsonl").exists()


def test_an_exec_answer_that_is_not_a_readable_call(tmp_path):
    src = shutil.copytree(FIXTURE, tmp_path / "bfcl")
    answers = src / "unused_datasets" / "possible_answer" / "BFCL_v4_exec_simple.json"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    rows[1]["ground_truth"] = ["calc(x=y)"]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"data": {**PARAMS["data"], "source": "local", "local_dir": str(src)}}
    msg = one_line_error(stage("fetch_bfcl", tmp_path / "out", cwd=tmp_path, params=params), "fetch_bfcl")
    assert msg == (f"fetch_bfcl: unused_datasets/possible_answer/BFCL_v4_exec_simple.json: row {rows[1]['id']}: "
                   "cannot read the answer 'calc(x=y)' as a call (not a literal value: y); fix that answer or leave "
                   "its source out of data.extra_files")
    assert not (tmp_path / "out").exists()  # not even the files read before it


def test_wheel_with_wrong_sha256_is_refused_and_not_kept(tmp_path, monkeypatch):
    def fake_download(cmd, **kwargs):  # pip "downloads" a wheel whose bytes are not the pinned ones
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "bfcl_eval-2026.3.23-py3-none-any.whl", "w") as zf:
            zf.writestr("bfcl_eval/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(wheels.subprocess, "run", fake_download)
    with pytest.raises(wheels.FetchError, match=r"bfcl-eval==2026\.3\.23: sha256 mismatch \(expected 0+, got [0-9a-f]{64}\)"
                                               r"; refusing a corrupt or changed download: rerun"):
        wheels.pip_wheel("bfcl-eval==2026.3.23", "0" * 64, cache=tmp_path)
    assert list((tmp_path / "wheels").rglob("*.whl")) == []
    assert isinstance(wheels.FetchError("x"), UserError)


# ---- model files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_missing_and_truncated_model_files(tiny, tmp_path):
    params = {"model": {**PARAMS["model"], "source": "local", "dtype": "float32", "path": str(tmp_path / "nowhere")}}
    msg = one_line_error(stage("fetch_model", "--out", tmp_path / "base", cwd=tmp_path, params=params), "fetch_model")
    assert msg == f"fetch_model: {tmp_path / 'nowhere'}: model directory does not exist; fix model.path in params.yaml"
    model = shutil.copytree(tiny, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "earlier.txt").write_text("an earlier model")
    params["model"]["path"] = str(model)
    msg = one_line_error(stage("fetch_model", "--out", tmp_path / "base", cwd=tmp_path, params=params), "fetch_model")
    assert msg.startswith(f"fetch_model: {weights}: not a readable safetensors file (")
    assert msg.endswith("the file is truncated or corrupt: copy or download it again")
    assert (tmp_path / "base" / "earlier.txt").read_text() == "an earlier model"  # the old output is intact


# ---- outputs that cannot be written


def leftovers(dir_):
    return sorted(p.name for p in Path(dir_).iterdir() if p.name.startswith("."))


def test_full_disk_leaves_no_partial_file_and_the_old_outputs(tmp_path, monkeypatch):
    pred, metrics = tmp_path / "pred.jsonl", tmp_path / "metrics.json"
    pred.write_text("old predictions\n")
    metrics.write_text("old metrics\n")
    real_write = Path.write_text

    def fills_up(path, text, *args, **kwargs):
        if path.name.startswith(".metrics"):  # the second of two outputs: half written, then ENOSPC
            real_write(path, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fills_up)
    with pytest.raises(WriteError) as e:
        io.write_texts({pred: "new predictions\n", metrics: json.dumps({"accuracy": 1.0})})
    assert str(e.value) == (f"cannot write {metrics}: No space left on device; free space or fix permissions "
                            "there and rerun (earlier outputs are unchanged)")
    assert pred.read_text() == "old predictions\n" and metrics.read_text() == "old metrics\n"
    assert leftovers(tmp_path) == []


def test_full_disk_on_a_real_small_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small tmpfs (the monkeypatched test above covers the logic)")
    try:
        (mnt / "metrics.json").write_text("old metrics\n")
        with pytest.raises(WriteError, match="No space left on device"):
            io.write_text(mnt / "metrics.json", "x" * 200_000)
        assert (mnt / "metrics.json").read_text() == "old metrics\n" and leftovers(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_unwritable_output_path(tmp_path, monkeypatch):
    old = tmp_path / "report.md"
    old.write_text("old report\n")
    if os.geteuid() != 0:  # root writes anywhere; elsewhere, a real read-only directory
        tmp_path.chmod(0o555)
    else:
        monkeypatch.setattr(io.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, os.strerror(errno.EACCES))))
    try:
        with pytest.raises(WriteError, match=rf"^cannot write {old}: Permission denied; free space or fix permissions"):
            io.write_text(old, "new report\n")
    finally:
        tmp_path.chmod(0o755)
    assert old.read_text() == "old report\n"


def _model_dir(path, text):
    path.mkdir()
    (path / "weights").write_text(text)


def test_a_directory_output_is_swapped_in_with_no_instant_absent(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    _model_dir(out, "old")
    # With the one-call exchange nothing is ever moved aside, so neither os.replace nor
    # a ".old" sibling appears; the old tree goes with the temporary directory.
    monkeypatch.setattr(io.os, "replace", lambda *a: pytest.fail("moved aside instead of exchanged"))
    with io.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
        (tmp / "extra").write_text("only in the new tree")
    assert sorted(p.name for p in out.iterdir()) == ["extra", "weights"]
    assert (out / "weights").read_text() == "new" and leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["no call", "refused"])
def test_without_an_exchange_the_two_renames_still_replace_the_directory(tmp_path, monkeypatch, how):
    out = tmp_path / "adapter"
    _model_dir(out, "old")
    if how == "no call":  # a C library without renameat2 / renamex_np
        monkeypatch.setattr(io, "_EXCHANGE", None)
    else:  # a kernel or filesystem that cannot swap: EINVAL, and the fallback runs
        monkeypatch.setattr(io, "_EXCHANGE", lambda *a: (io.ctypes.set_errno(errno.EINVAL), -1)[1])
    with io.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and leftovers(tmp_path) == []


def test_a_failed_exchange_is_a_write_error_and_keeps_the_old_directory(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    _model_dir(out, "old")
    monkeypatch.setattr(io, "_EXCHANGE", lambda *a: (io.ctypes.set_errno(errno.EACCES), -1)[1])
    with pytest.raises(WriteError, match=rf"^cannot write {out}: Permission denied"):
        with io.atomic_dir(out) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old" and leftovers(tmp_path) == []


def test_stage_output_path_that_is_not_a_directory(tmp_path):
    bfcl = write_bfcl(tmp_path / "bfcl", bfcl_rows())
    (tmp_path / "out").write_text("a file where the output directory should be")
    msg = one_line_error(stage("split", bfcl, tmp_path / "out", tmp_path / "split.json", cwd=tmp_path, params=SPLIT), "split")
    assert msg == (f"split: cannot write {tmp_path / 'out' / 'train.jsonl'}: a file is in the way of its directory "
                   f"{tmp_path / 'out'}; move that file away and rerun")


# ---- validation and Ctrl-C


def split_files(dir_, bad_test_row=False):
    """``dir_`` as stage split writes it (the fixture's live rows as test_live), and its metrics beside it,
    ``<dir_>.json``; returns the test rows."""
    from toolcall.bfcl.sources import read_extra

    rows = bfcl_rows()
    train = [r for cat in rows.values() for r in cat[3:]]
    test = [r for cat in rows.values() for r in cat[:3]]
    if bad_test_row:
        test[4]["ground_truth"] = [{"no_such_function": {}}]
    live = read_extra("local", PARAMS["data"]["extra_files"], PARAMS["split"]["live_test"], local_dir=FIXTURE)
    io.write_jsonl(dir_ / "train.jsonl", train[2:])
    io.write_jsonl(dir_ / "valid.jsonl", train[:2])
    io.write_jsonl(dir_ / "test.jsonl", test)
    io.write_jsonl(dir_ / "extra.jsonl", [])  # an empty extra pool (data.extra_files: {}) is legitimate
    io.write_jsonl(dir_ / "test_live.jsonl", [r for rows in live.values() for r in rows])
    io.write_json(f"{dir_}.json", {"test_live": {"n_dropped": 0, "by_source": {
        name: {"n_in": len(rows), "n_kept": len(rows)} for name, rows in live.items()}}})
    return test


def test_validation_never_drops_a_test_row_silently(tiny, tmp_path):
    test = split_files(tmp_path / "split", bad_test_row=True)
    out = tmp_path / "validated"
    out.mkdir()
    (out / "test.jsonl").write_text("the earlier validated test split\n")
    params = {"validate": {**PARAMS["validate"], "max_seq_len": 4096, "live_max_seq_len": 4096}}
    proc = stage("validate", tmp_path / "split", tmp_path / "split.json", tiny, out, tmp_path / "validate.json",
                 cwd=tmp_path, params=params)
    msg = one_line_error(proc, "validate")
    assert msg == (f"validate: {tmp_path / 'split'}/test.jsonl: 1 test row(s) fail validation: "
                   f"{test[4]['id']} (gold:unknown_function); the test split must stay complete: fix those rows "
                   "in the data, or change split.seed so that they land in training")
    assert (out / "test.jsonl").read_text() == "the earlier validated test split\n"
    assert not (tmp_path / "validate.json").exists()


def test_ctrl_c_during_eval_leaves_the_old_outputs(tiny, tmp_path):
    rows = [dict(r, id=f"{r['id']}-{i}") for i in range(20) for r in split_files(tmp_path)]  # 240 long generations
    io.write_jsonl(tmp_path / "test.jsonl", rows)
    pred, metrics = tmp_path / "pred.jsonl", tmp_path / "metrics.json"
    pred.write_text("old predictions\n")
    metrics.write_text("old metrics\n")
    proc = stage("eval", "sft", "--model", tiny, "--test", tmp_path / "test.jsonl", "--workers", "2",
                 "--predictions", pred, "--metrics", metrics, cwd=tmp_path,
                 params={"eval": {**PARAMS["eval"], "max_tokens": 2000, "batch_size": 2}},
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                 # As from a terminal: a shell's background job (`make test &`) runs with SIGINT
                 # ignored, which Python then keeps, and the stage would never see the Ctrl-C.
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # generation has started in the workers
        if line.startswith("[eval sft"):
            break
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    start = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30  # the workers were stopped, not waited for
    msg = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "eval", status=130)
    assert msg == "eval: interrupted (Ctrl-C); no output is half-written, rerun the stage to finish it"
    assert pred.read_text() == "old predictions\n" and metrics.read_text() == "old metrics\n"
    assert leftovers(tmp_path) == []


def test_user_errors_share_one_base_class():
    from toolcall.errors import DataError as DataErrorFromData, ModelError

    assert DataErrorFromData is DataError
    for cls in (DataError, WriteError, ModelError, wheels.FetchError):
        assert issubclass(cls, UserError)
