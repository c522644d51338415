"""Speed and fidelity measurements: `make bench` (bench/bench.py, one module per section) and `make serving`."""
