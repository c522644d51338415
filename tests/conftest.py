"""Test order for `make test`'s two xdist processes (`-n 2 --dist loadfile --no-loadscope-reorder`).

The DAG's one `dvc repro` (tests/pipeline_repo.py) is the longest single piece:
test_pipeline.py goes first, so that one process builds the repo while the
other works through the rest, and test_pipeline_reruns.py, which copies the
built repo, last.
"""

FIRST, LAST = "test_pipeline.py", "test_pipeline_reruns.py"


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: {FIRST: 0, LAST: 2}.get(item.path.name, 1))
