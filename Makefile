# The README's two set-up commands. Both create .venv and install everything on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# extra `lcmkit demo` flags, e.g. make demo DEMO_ARGS="--overwrite" (a second run keeps the first demo/ unless told)
DEMO_ARGS ?=

.PHONY: demo test install clean

$(BIN)/lcmkit: pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (set PY=python3.x)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/lcmkit

install: $(BIN)/lcmkit

demo: install
	$(BIN)/lcmkit demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build src/*.egg-info
