# The README's two commands: `make quickstart` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv quickstart test bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU wheel that lies on this project's machines; on a GPU box
# install your own torch first and this step keeps it.
venv: $(BIN)/activate
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"

quickstart: venv
	PATH=$(abspath $(BIN)):$$PATH bash scripts/quickstart.sh

test: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) runs data
