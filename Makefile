# The two entry points of the README. Each runs scripts/setup.sh first (a no-op once installed).
.PHONY: setup demo test lint mutate setup-gpu-stack test-gpu-stack kernel-compile-report \
	gpu-wheels gpu-check

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/fastdpo demo

test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

# The same suite under the GPU machine's stack (torch 2.11, triton 3.6, transformers 5.17,
# numpy 2.5, Python 3.12) in .venv-gpu-stack: ~5 GB on disk, ~2 min to install once.
setup-gpu-stack:
	@bash scripts/setup_gpu_stack.sh

test-gpu-stack: setup-gpu-stack
	.venv-gpu-stack/bin/python -m pytest -q -n 2 --dist loadfile

# Every Triton kernel compiled for sm_90 and sm_80 without a GPU (registers, spills, shared
# memory, wgmma), under each venv's triton.
kernel-compile-report: setup
	env -u TRITON_INTERPRET .venv/bin/python benchmarks/kernel_compile_report.py
	if [ -x .venv-gpu-stack/bin/python ]; then \
		env -u TRITON_INTERPRET .venv-gpu-stack/bin/python benchmarks/kernel_compile_report.py; fi

# Wheels benchmarks/gpu_check.sh installs on the GPU machine, which reaches no index (Python 3.12,
# x86-64): the benchmark comparisons, TRL and datasets, and setuptools to install fastdpo.
GPU_WHEELS := liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 \
	dill==0.4.1 multiprocess==0.70.19 setuptools==84.2.1
gpu-wheels: setup
	.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d build/gpu-wheels $(GPU_WHEELS)
	git describe --always --dirty >build/gpu-wheels/COMMIT

# The GPU window's validation (benchmarks/gpu_check.sh); a dry run on a machine without CUDA.
gpu-check:
	bash benchmarks/gpu_check.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

# Mutation testing with mutmut (not in CI: tens of minutes). `make mutate` runs every module;
# `make mutate MUTATE="losses planner"` picks some. Each module runs in its own scratch copy
# under build/mutate/<module> (the working tree is never mutated), with only its own test files,
# at low priority; rerunning resumes (delete build/mutate/<module> to start over once tests
# changed). Survivors and how each was judged: tests/MUTATION.md.
MUTMUT_VERSION := 3.8.1
MUTATE ?= losses planner data reference model ops
MUTATE_JOBS ?= 2
MUTATE_DIR := build/mutate
MUTATE_SRC_losses := fastdpo/losses/*.py
MUTATE_TESTS_losses := tests/test_losses.py tests/test_loss_metrics_values.py \
	tests/test_fused_linear_preference_loss.py
MUTATE_SRC_planner := fastdpo/data/planner.py
MUTATE_TESTS_planner := tests/test_planner_exact.py tests/test_data_packing.py
MUTATE_SRC_data := fastdpo/data/*
MUTATE_TESTS_data := $(wildcard tests/test_data_*.py) tests/test_planner_exact.py
MUTATE_SRC_reference := fastdpo/reference*.py
MUTATE_TESTS_reference := tests/test_reference.py tests/test_reference_refusals.py
MUTATE_SRC_model := fastdpo/model.py fastdpo/attention/*.py
MUTATE_TESTS_model := tests/test_model.py tests/test_model_autocast.py tests/test_attention.py
MUTATE_SRC_ops := fastdpo/ops/*
MUTATE_TESTS_ops := tests/test_linear_logprobs.py tests/test_linear_logprobs_adversarial.py \
	tests/test_preference_loss_kernel.py tests/test_fused_linear_preference_loss.py

define mutate_module
	@echo "== mutate $(1): $(MUTATE_SRC_$(1))"
	@mkdir -p $(MUTATE_DIR)/$(1) && cp -rp fastdpo tests pyproject.toml $(MUTATE_DIR)/$(1)/ && \
		find $(MUTATE_DIR)/$(1) -name __pycache__ -prune -exec rm -rf {} +
	@cd $(MUTATE_DIR)/$(1) && { \
		echo "[mutmut]"; echo "source_paths = fastdpo"; echo "only_mutate ="; \
		for f in $(MUTATE_SRC_$(1)); do echo "  $$f"; done; \
		echo "pytest_add_cli_args = -p no:xdist -p no:cacheprovider"; \
		echo "pytest_add_cli_args_test_selection ="; \
		for t in $(MUTATE_TESTS_$(1)); do if [ -f "$$t" ]; then echo "  $$t"; fi; done; \
	} > setup.cfg
	cd $(MUTATE_DIR)/$(1) && mkdir -p mutants && PYTHONPATH=$$PWD/mutants nice -n 19 \
		$(CURDIR)/.venv/bin/mutmut run --max-children $(MUTATE_JOBS) > run.log 2>&1 || \
		{ tail -30 run.log; exit 1; }
	cd $(MUTATE_DIR)/$(1) && $(CURDIR)/.venv/bin/mutmut results --all true > results.txt; \
		grep -c ": survived" results.txt | xargs echo "   survived:"; \
		echo "   details: $(MUTATE_DIR)/$(1)/results.txt (mutmut show <name> there)"

endef

mutate: setup
	.venv/bin/python -m pip install -q "mutmut==$(MUTMUT_VERSION)"
	$(foreach module,$(MUTATE),$(call mutate_module,$(module)))
