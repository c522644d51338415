# Two entry points (see README): `make repro` runs the study, `make test` the tests.
# Both create the environment first if it is missing or requirements changed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: repro exp smoke ablations export serving test bench env native openblas clean-env

# The main study (Table 1 with DPO and RL), every seed of params study.seeds: the two report
# stages read every seed's evals, so they pull in exactly the per-seed training and eval stages.
# The ablations are their own target: hours on a CPU.
repro: $(STAMP) native
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro report report_post_sft

# One knob on the main study only, e.g. make exp ARGS="-S sft.lora_rank=16": without targets,
# dvc exp run would also rerun every ablation arm that reads the changed section.
exp: $(STAMP) native
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc exp run $(ARGS) report report_post_sft

# The main study end to end on tiny budgets (5 test items a category, 20 SFT steps, 8 DPO and RL
# prompts): a smoke run of every stage on the real data and model, not results. It runs in a
# temporary copy (dvc exp run --temp), so the workspace and its metrics stay as they are; see it
# with `dvc exp show`. Append more -S with ARGS.
SMOKE := -S "study.seeds=[0]" -S split.test_per_category=5 -S sft.iters=20 -S sft.warmup=2 -S sft.steps_per_eval=0 -S sft.patience=0 \
	-S dpo.prompts=8 -S dpo.valid_prompts=4 -S dpo.steps_per_eval=0 -S dpo.batch_size=4 -S dpo.warmup=0 \
	-S rl.rounds=2 -S rl.prompts=8 -S rl.iters=2
smoke: $(STAMP) native
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc exp run --temp $(SMOKE) $(ARGS) report report_post_sft

ablations: $(STAMP) native
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro report_ablations

# Fused model + GGUF of each tuned variant in models/export/ (not part of repro).
export: $(STAMP) native
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro export

# Served / fused / GGUF vs eval on the real tuned model, the first seed's run (after repro and export):
# metrics/serving.json.
serving: $(TEST_STAMP)
	$(PY) -m toolcall.serve.acceptance --variant sft

# The test requirements install while the native kernels build; the tests then spread over two
# processes, each test file whole in one, in the order tests/conftest.py sets (the DAG's repro first).
test: $(STAMP)
	@$(MAKE) --no-print-directory -j2 $(TEST_STAMP) native
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

bench: $(STAMP) native
	$(PY) bench/bench.py

env: $(STAMP) native

# The native CPU kernels (toolcall/model/kernels.py): built once per source and toolchain into
# ~/.cache/toolcall/native/ (about a minute on 2 cores); a no-op when built. Where they
# cannot be built or run, one warning line, and MLX's own ops are used.
native: $(STAMP)
	$(PY) -m toolcall.model.kernels

$(STAMP): requirements.txt pyproject.toml
	@$(MAKE) --no-print-directory openblas
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.txt requirements-torch.txt
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --upgrade --target $(VENV)/torch-site -r requirements-torch.txt
	touch $@

# MLX's Linux CPU wheel ships reference BLAS; toolcall loads OpenBLAS instead
# (toolcall/blas.py). Install it where we can, warn in one line where we cannot.
openblas:
	@if [ "$$(uname -s)" != Linux ]; then exit 0; fi; \
	if ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	else \
		echo "WARNING: libopenblas0-pthread missing and not root: MLX will run ~30-50x slower (apt-get install libopenblas0-pthread)"; \
	fi

clean-env:
	rm -rf $(VENV)
