"""README.md and docs/: the results table is the committed report's, the page stays short, every link resolves.

Fast and offline: reads files only (no model, no DVC).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolcall.repo import git
from toolcall.report import readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_results_block_is_what_the_generator_makes_from_the_committed_report():
    _, block, _ = readme.split_readme(README.read_text(encoding="utf-8"))
    wanted = readme.results_block((ROOT / readme.REPORT).read_text(encoding="utf-8"))
    assert block == wanted, "README.md's results block is stale: run python -m toolcall.report.readme"


def report_revision():
    """Where the report's own metrics are: the commit that last changed it, or the working tree when it has
    uncommitted changes. A real run lands stage by stage (toolcall.chain), so the eval metrics committed
    after the report may be a newer run's until the report stages run again; the report stays what it
    was, numbers and all, and is checked against the metrics it was made from."""
    if git("status", "--porcelain", "--", readme.REPORT, cwd=ROOT).strip():
        return None
    return git("log", "-1", "--format=%H", "--", readme.REPORT, cwd=ROOT).strip() or None


def read_at(revision, path):
    if revision is None:
        return (ROOT / path).read_text()
    return git("show", f"{revision}:{path}", cwd=ROOT)


def test_the_report_the_readme_shows_agrees_with_the_eval_metrics_it_was_made_from():
    """Each method's overall mean in the block equals the mean of its metrics/eval files over study.seeds,
    as committed with the report (``report_revision``)."""
    revision = report_revision()
    seeds = yaml.safe_load(read_at(revision, "params.yaml"))["study"]["seeds"]
    _, block, _ = readme.split_readme(README.read_text(encoding="utf-8"))
    shown = {row["Method"]: row for row in readme.table(block, "Method", "README.md")[1]}
    files = {"Base model": ["metrics/eval/base.json"]}
    for variant, name in [("sft", "SFT"), ("sft_dpo", "SFT + DPO"), ("sft_rl", "SFT + RL")]:
        files[name] = [f"metrics/eval/{variant}/s{s}.json" for s in seeds]
    assert set(shown) == set(files)
    for name, paths in files.items():
        accuracies = [json.loads(read_at(revision, p))["overall"]["accuracy"] for p in paths]
        overall = next(v for k, v in shown[name].items() if k.startswith("overall"))
        assert overall.split("%")[0] == f"{100 * sum(accuracies) / len(accuracies):.1f}", name


def test_check_exits_1_with_a_diff_and_a_rewrite_fixes_it(tmp_path):
    text = README.read_text(encoding="utf-8")
    stale = tmp_path / "README.md"
    stale.write_text(text.replace("| SFT + DPO | ", "| SFT + DPO (stale) | ", 1), encoding="utf-8")
    run = [sys.executable, "-m", "toolcall.report.readme", "--readme", str(stale)]
    check = subprocess.run([*run, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 1
    assert "-| SFT + DPO (stale) | " in check.stdout and "+| SFT + DPO | " in check.stdout
    assert subprocess.run(run, cwd=ROOT, capture_output=True).returncode == 0
    assert stale.read_text(encoding="utf-8") == text
    assert subprocess.run([*run, "--check"], cwd=ROOT, capture_output=True).returncode == 0


def test_the_generator_refuses_a_readme_without_its_markers():
    with pytest.raises(SystemExit, match="results:start"):
        readme.split_readme("# no markers here\n")


def test_readme_fits_on_200_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move detail to docs/"


def test_readme_links_every_docs_page_and_each_exists():
    linked = {t.split("#")[0] for t in LINK.findall(README.read_text(encoding="utf-8")) if t.startswith("docs/")}
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked, "a docs/ page the README does not link"
    for target in linked:
        assert (ROOT / target).is_file(), f"README.md links {target}, which does not exist"


def slug(heading):
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(page):
    """A page's text without its fenced code blocks (a ``# comment`` there is no heading)."""
    return re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)


def anchors(page):
    return {slug(m) for m in re.findall(r"^#+ (.+)$", prose(page), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        assert where.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(where), f"{page.name}: {target}: no heading with that anchor"


def test_docs_errors_lists_every_params_key():
    """docs/errors.md's key table is params.yaml's sections and keys, in order."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    sections = {f"ablations.{k}" if name == "ablations" else name: v
                for name, section in params.items()
                for k, v in (section.items() if name == "ablations" else [(name, section)])}
    wanted = {name: list(keys) for name, keys in sections.items()}
    rows = re.findall(r"^\| `\[([\w.]+)\]` \| (.+) \|$", (ROOT / "docs/errors.md").read_text(encoding="utf-8"), re.M)
    listed = {name: re.findall(r"`(\w+)`", keys) for name, keys in rows}
    assert listed == wanted
