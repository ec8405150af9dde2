"""mom-ds's shared test and benchmark helpers, one package that tests/ and bench/ import
(installed editable by `make venv`; docs/testing.md):

- runs.py: the tiny byte-level corpus (`write_byte_data`), mom-train in a subprocess with a
  timeout (`mom_train`, `run_python`), the tiny recipe's arguments, metrics.jsonl read back;
- multirank.py: several gloo ranks of one function in one test (`run_ranks`);
- launchers.py: a real Slurm on localhost, the launcher tests' environment and arguments;
- two_hosts.py: two hosts in network namespaces for the two-node checks;
- sync_guard.py: the aten-level guard that fails on a device-to-host sync;
- pool_modules.py: a routed block's modules, by kind;
- corpus.py: an English corpus on every machine (pydoc topics, stdlib docstrings), for the
  benchmarks.

Paths (REPO) are the checkout's: the package is meant to be installed editable."""
