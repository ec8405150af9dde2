# The README's two commands: `make quickstart` and `make test`; `make test-fast` while editing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv venv-hf4 quickstart test test-fast bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU wheel that lies on this project's machines; on a GPU box
# install your own torch first and this step keeps it.
venv: $(BIN)/activate
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]" -c constraints.txt
	# the shared test and benchmark helpers (testing/: not part of the mom-ds wheel)
	$(BIN)/pip install -q -e ./testing

# transformers 4.x beside .venv's 5.x, for tests/model/test_hf_export_hf4.py (the exports load with
# both): its own transformers, tokenizers and huggingface_hub come first on sys.path, then
# .venv's site-packages through a .pth line, so torch is not installed twice. pip sees .venv's
# packages and reports their requirements that 4.x's pins break: they hold in .venv itself.
HF4_VENV := .venv-hf4
HF4_VERSION ?= 4.44.*
venv-hf4: venv
	test -x $(HF4_VENV)/bin/python || $(BIN)/python -m venv $(HF4_VENV)
	echo '*' > $(HF4_VENV)/.gitignore
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(HF4_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/mom_ds_venv.pth"
	$(HF4_VENV)/bin/pip install -q "transformers==$(HF4_VERSION)" safetensors tokenizers
	$(HF4_VENV)/bin/python -c "import transformers, torch; print('$(HF4_VENV): transformers', transformers.__version__, 'torch', torch.__version__)"

quickstart: venv
	PATH=$(abspath $(BIN)):$$PATH bash scripts/quickstart.sh

test: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -ra tests

# The fast tier (docs/testing.md): the unit tests and one end-to-end training run, not the
# launchers, multi-rank, two-host or other slow tests, which `make test` (CI) runs.
test-fast: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -ra -m "not slow or smoke" tests

clean:
	rm -rf $(VENV) $(HF4_VENV) runs data
