"""BFCL data: fetch, normalize, split, validate; the ablation splits.

A normalized row (one JSON line in ``data/bfcl/<category>.jsonl``)::

    {"id": "simple_python_0", "category": "simple",
     "messages": [{"role": "user", "content": "..."}],
     "functions": [<BFCL schema>, ...],
     "ground_truth": [{"fn.name": {"param": [allowed values]}}]}

Schemas and answers are kept exactly as BFCL ships them: the scorer needs the
original types ("dict", "float", "tuple", "any"); only the prompt maps them to
JSON Schema names.

Rows of an extra training source (params ``data.extra_files``: BFCL's live_*
files and the exec_* files under ``unused_datasets/``) are normalized the same way,
with ``category`` the call pattern their answers follow (what the scorer
needs) and one more field, ``"source": "<name>"``; the paper's four files'
rows carry no ``source``, so they are byte for byte what they were before
extra sources existed. The rows of ``split.live_test``'s sources (the live_*
files) form a second test set, test_live, and are never trained on; the
other extra rows only ever join the training side: the sources of
``data.extra`` in the main study, others in its ablation arms.
"""


# The paper's four call categories, in report order.
CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")
