"""One script per DVC stage, run from the repo root as ``python -m stages.<name>`` (see dvc.yaml)."""
